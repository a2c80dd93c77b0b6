"""Prometheus metrics, named like vLLM's with the project's prefix ``gfn:`` in place of ``vllm:``.

A dashboard built on vLLM's Grafana example works with ``vllm:`` replaced by ``gfn:``.
Counters end in ``_total``. Labels stay bounded: ``endpoint`` is a route template,
``adapter`` an adapter name (versions appear only on ``gfn:adapter_info``, whose series are
removed on unload), ``status`` an HTTP status code. Each app has its own registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from service.engines.base import Engine

disable_created_metrics()  # a process-wide switch: no `_created` series (one per counter and histogram child; unread)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.e2e = Histogram("gfn:e2e_request_latency_seconds", "End-to-end request latency.",
                             ["endpoint", "adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("gfn:request_queue_time_seconds", "Time a request waited before the engine ran it.",
                               ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_sample = Histogram("gfn:time_to_first_sample_seconds",
                                      "Time from arrival to the first sample delivered (a request's n samples come together).",
                                      ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("gfn:requests", "Requests by endpoint, adapter name and HTTP status.",
                                ["endpoint", "adapter", "status"], registry=r)
        self.tokens = Counter("gfn:generation_tokens", "Latent tokens generated.", ["adapter"], registry=r)
        self.samples = Counter("gfn:samples", "Samples (latents) generated.", ["adapter"], registry=r)
        self.running = Gauge("gfn:num_requests_running", "Requests the engine is computing.", registry=r)
        self.waiting = Gauge("gfn:num_requests_waiting", "Requests queued in front of the engine.", registry=r)
        self.batch_size = Histogram("gfn:batch_size", "Samples per generation step (transformers engine).",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.cache_lookups = Counter("gfn:cache_lookups", "Rationale cache lookups.", ["adapter"], registry=r)
        self.cache_hits = Counter("gfn:cache_hits", "Lookups answered entirely from the cache.", ["adapter"],
                                  registry=r)
        self.cache_errors = Counter("gfn:cache_errors", "Cache operations that failed (the cache was bypassed).",
                                    registry=r)
        self.adapter_info = Gauge("gfn:adapter_info", "1 for each loaded adapter version.",
                                  ["name", "version", "rank"], registry=r)
        self.adapter_load = Histogram("gfn:adapter_load_seconds", "Time to check, load and warm an adapter.",
                                      buckets=LATENCY_BUCKETS, registry=r)

    def adapter_loaded(self, name: str) -> None:
        """Start an adapter's counters at zero, so that its rates and hit ratio exist from its first scrape."""
        for counter in (self.tokens, self.samples, self.cache_lookups, self.cache_hits):
            counter.labels(name)

    def watch(self, engine: Engine) -> None:
        """Read the engine's queue gauges at scrape time."""
        self.running.set_function(lambda: engine.running)
        self.waiting.set_function(lambda: engine.waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
