"""A worker's Prometheus metrics, named like the service's (prefix `gfn:`).

Queue sizes and the running job's progress are read from Redis at scrape time; the
counter of ended jobs is this worker's (sum it over workers). Labels stay bounded:
`status` is an outcome, `adapter` an adapter name.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from jobs.queue import JobNotFound, JobQueue

disable_created_metrics()  # a process-wide switch: no `_created` series (one per counter and histogram child; unread)

OUTCOMES = ("finished", "failed", "cancelled", "retried")
RUNNING = {  # the running job's progress, labelled with its adapter name
    "gfn:worker_job_step": "Steps the running job has trained.",
    "gfn:worker_job_steps": "Steps the running job trains in all.",
    "gfn:worker_job_steps_per_second": "Training steps per second of the running job.",
    "gfn:worker_job_loss": "Loss at the running job's last step.",
    "gfn:worker_job_log_reward": "Mean log-reward at the running job's last step.",
}


class WorkerMetrics(Collector):
    def __init__(self, jobs: JobQueue):
        self.jobs = jobs
        self.running_job: str | None = None  # set by the worker's main thread, read at scrape time
        self.registry = CollectorRegistry()
        self.ended = Counter("gfn:worker_jobs", "Jobs this worker ran to an end, by outcome "
                             "(retried: failed and queued again).", ["status"], registry=self.registry)
        for outcome in OUTCOMES:  # at zero from the start, so that increase() sees the first one
            self.ended.labels(outcome)
        self.registry.register(self)

    def job_ended(self, job_id: str) -> None:
        """Counts this worker's outcome; none for an attempt that stepped aside (the job still runs elsewhere)."""
        try:
            status = self.jobs.status(job_id).status
        except (RedisError, JobNotFound):
            return
        if (outcome := "retried" if status == "queued" else status) in OUTCOMES:
            self.ended.labels(outcome).inc()

    def collect(self) -> Iterator[Metric]:
        try:
            queued, running = self.jobs.queue.count, self.jobs.queue.started_job_registry.get_job_count(cleanup=False)
            job_id = self.running_job
            status = self.jobs.status(job_id) if job_id else None
        except (RedisError, JobNotFound):
            return
        yield GaugeMetricFamily("gfn:jobs_queued", "Training jobs waiting for a worker.", value=queued)
        yield GaugeMetricFamily("gfn:jobs_running", "Training jobs running on any worker.", value=running)
        families = {name: GaugeMetricFamily(name, doc, labels=["adapter"]) for name, doc in RUNNING.items()}
        if status is not None and (p := status.progress) is not None:
            rate = p.step / p.elapsed if p.elapsed else 0.0
            for family, value in zip(families.values(), (p.step, p.total, rate, p.loss, p.log_reward)):
                family.add_metric([status.name], value)
        yield from families.values()


def serve_metrics(registry: CollectorRegistry, port: int) -> None:
    """Serve ``registry`` on ``port`` (any path) from a daemon thread, always in Prometheus' text
    format, as the service's /metrics. prometheus_client's own server answers a Prometheus scrape
    in OpenMetrics with escaping=underscores, which renames every `gfn:x` sample `gfn_x`: no
    dashboard panel or alert would see the worker."""

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # a scrape every 15 s is no news
            pass

    server = ThreadingHTTPServer(("", port), Metrics)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
