"""Everything a running service holds, built at start-up and closed at shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from redis import Redis
from transformers import PreTrainedTokenizerBase

from adapters.calculator import TokenCalculator
from adapters.errors import AdapterError, AdapterNotFound
from adapters.fingerprint import WEIGHT_SUFFIXES, fingerprint
from adapters.manifest import Dtype, Manifest
from adapters.models import context_ids, load_tokenizer, pad_id, piece_ids, piece_text, tokenizer_digest
from adapters.store import AdapterStore, format_ref, parse_ref
from jobs import JobQueue
from service.cache import RationaleCache
from service.engines import start_engine
from service.engines.base import Engine, GenRequest, GenResult
from service.errors import AdapterRefused
from service.metrics import Metrics
from service.registry import Registry
from service.settings import Settings
from service.watcher import AdapterWatcher

log = logging.getLogger("gfn.service")


@dataclass
class ServiceState:
    settings: Settings
    base_model: str
    tokenizer: PreTrainedTokenizerBase
    engine: Engine
    registry: Registry
    cache: RationaleCache
    metrics: Metrics
    calculator: TokenCalculator
    jobs: JobQueue | None
    """The training-job queue; None without Redis (then /jobs answers 503)."""
    watcher: AdapterWatcher
    refused: dict[str, str] = field(default_factory=dict)
    """Adapters that failed to load, at start or as new versions, with the reason (shared with the watcher)."""
    in_flight: int = 0

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> ServiceState:
        """Load the base model into the engine, then check, load and warm the start-up adapters;
        one that fails is reported (logs, /ready, GET /adapters) and the others serve."""
        store = AdapterStore(settings.store)
        base_model = base_model_of(settings)
        base_fingerprint = await asyncio.to_thread(fingerprint, base_model)
        wanted, refused = _startup_adapters(store, settings.adapters, base_fingerprint)
        newest = [candidates[0] for _, candidates in wanted if candidates]  # the engine is sized for these
        tokenizer = load_tokenizer(base_model)
        engine = await start_engine(settings, base_model, pad_id(tokenizer), tokenizer.eos_token_id,
                                    [m.lora for m in newest], serving_dtype(settings, newest),
                                    on_batch=metrics.batch_size.observe)
        metrics.watch(engine)
        registry = Registry(store, engine, base_fingerprint, tokenizer_digest(tokenizer), metrics, refused)
        jobs = None
        if settings.redis_url:
            jobs = JobQueue(Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2))
        followed = None if settings.adapters is None else frozenset(parse_ref(r)[0] for r in settings.adapters)
        watcher = AdapterWatcher(registry, store, settings.redis_url, settings.watch_poll_s, refused, followed)
        cache = RationaleCache(metrics, settings.redis_url, settings.cache_size, settings.max_n, settings.cache_ttl_s)
        state = cls(settings=settings, base_model=str(base_model), tokenizer=tokenizer, engine=engine,
                    registry=registry, cache=cache, metrics=metrics, calculator=TokenCalculator(tokenizer), jobs=jobs,
                    watcher=watcher, refused=refused)
        for pinned, candidates in wanted:
            for manifest in candidates:  # the first that loads; each refused one is listed
                try:
                    await state.registry.load(manifest.name, manifest.version, pin=pinned)
                    break
                except (AdapterError, AdapterRefused) as error:
                    state.refused[manifest.ref] = str(error)
        for ref, reason in state.refused.items():  # another model's adapters in a shared store are no fault
            level = logging.INFO if reason.startswith(OTHER_BASE) else logging.ERROR
            log.log(level, "adapter refused", extra={"adapter": ref, "reason": reason})
        state.watcher.start()
        log.info("service started", extra={"engine": engine.name, "base_model": str(base_model), "dtype": engine.dtype,
                                           "adapters": sorted(state.registry.entries)})
        return state

    async def stop(self) -> None:
        await self.watcher.stop()
        await self.registry.close()
        await self.engine.stop()
        await self.cache.close()

    async def readiness(self) -> dict[str, Any]:
        """Ready: the engine runs (start-up loading is done by then) and Redis answers when configured."""
        redis = await self.cache.ping()
        return {
            "ready": self.engine.alive and redis is not False,
            "engine": self.engine.name,
            "dtype": self.engine.dtype,
            "adapters": self.registry.live_refs(),
            "refused": self.refused,
            "redis": {None: "not configured", True: "ok", False: "unreachable: rationale cache bypassed, /jobs unavailable"}[redis],
        }

    async def sample(self, request: Request, req: GenRequest) -> GenResult:
        """One generate call, with its queue time, time to first sample, samples and tokens in the metrics."""
        [result] = await self.engine.generate([req])
        endpoint = request.scope["route"].path
        self.metrics.queue.labels(endpoint).observe(result.queue_s)
        self.metrics.first_sample.labels(endpoint).observe(time.perf_counter() - request.state.started)
        name = (req.adapter or "").partition("@")[0]
        self.metrics.tokens.labels(name).inc(sum(len(s.token_ids) for s in result.samples))
        self.metrics.samples.labels(name).inc(len(result.samples))
        return result

    def encode(self, text: str) -> list[int]:
        """A piece of text, joined id-wise to what it follows."""
        return piece_ids(self.tokenizer, text)

    def encode_context(self, text: str, manifest: Manifest) -> list[int]:
        """A text the model reads from its start, as the adapter's training read it: its document
        prefix (the tokenizer's BOS, where there is one; none in manifests from before the prefix),
        then the text."""
        return context_ids(self.tokenizer, text, manifest.document_prefix)

    def decode(self, ids: list[int]) -> str:
        """The text of a piece's ids (a sample), as it reads after its prompt."""
        return piece_text(self.tokenizer, ids)


class NoBaseModel(RuntimeError):
    """There is no base model to serve; the message says what to set."""


def base_model_of(settings: Settings) -> str:
    """The model directory to serve: GFN_BASE_MODEL, else the one the newest stored adapter was
    trained on. Checked before the engine starts, so that a typo is one line, not a traceback."""
    path = settings.base_model or _newest_base(AdapterStore(settings.store))
    source = "GFN_BASE_MODEL" if settings.base_model else "the newest stored adapter's base model"
    if not (Path(path) / "config.json").is_file():
        raise NoBaseModel(f"{source} {path} is no model directory (it has no config.json)")
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in Path(path).iterdir()):
        raise NoBaseModel(f"{source} {path} holds no weights (no *.safetensors or *.bin file)")
    return path


def serving_dtype(settings: Settings, manifests: list[Manifest]) -> Dtype:
    """GFN_DTYPE; under auto, the one dtype ``manifests`` were trained in (float32 where they differ)."""
    if settings.dtype != "auto":
        return settings.dtype
    trained = {m.base_model.dtype for m in manifests}
    return trained.pop() if len(trained) == 1 else "float32"


def _newest_base(store: AdapterStore) -> str:
    manifests = []
    for name in store.names():
        try:
            manifests.append(store.manifest(name))
        except AdapterError:
            continue
    if not manifests:
        raise NoBaseModel(f"no base model: set GFN_BASE_MODEL, or train an adapter into {store.root} first")
    return max(manifests, key=lambda m: m.created_at).base_model.path


def _startup_adapters(store: AdapterStore, refs: list[str] | None, base_fingerprint: str
                      ) -> tuple[list[tuple[bool, list[Manifest]]], dict[str, str]]:
    """(pinned, candidates) for each adapter to load at start, and those refused already. The
    candidates are tried in order until one loads: for a name, its versions trained on this base
    model, newest first (one damaged save must not take a name offline); for 'name@vN', that version.

    Without a list: every stored name. With one: 'name' or 'name@vN' (pinned)."""
    wanted: list[tuple[bool, list[Manifest]]] = []
    refused: dict[str, str] = {}
    for ref in refs if refs is not None else store.names():
        try:
            name, version = parse_ref(ref)
            if version:
                wanted.append((True, [store.manifest(name, version)]))
                continue
            versions = list(reversed(store.versions(name)))
            if not versions:
                raise AdapterNotFound(f"no adapter named {name!r} in {store.root}")
        except AdapterError as error:
            refused[ref] = str(error)
            continue
        wanted.append((False, _candidates(store, name, versions, base_fingerprint, refused)))
    return wanted, refused


OTHER_BASE = "trained on another base model"


def _candidates(store: AdapterStore, name: str, versions: list[int], base_fingerprint: str,
                refused: dict[str, str]) -> list[Manifest]:
    """The manifests of `versions` (newest first) trained on this base model. Into `refused`, said
    why: each damaged version newer than the first of them, and the newest if it is another model's."""
    candidates = []
    for version in versions:
        try:
            manifest = store.manifest(name, version)
        except AdapterError as error:
            if not candidates:  # past the version that would serve, damage is for `gfn adapters list`
                refused[format_ref(name, version)] = str(error)
            continue
        if manifest.base_model.fingerprint == base_fingerprint:
            candidates.append(manifest)
        elif version == versions[0]:  # the version the watcher would offer: refused now, and said why
            refused[manifest.ref] = (f"{OTHER_BASE} ({manifest.base_model.path}, "
                                     f"{manifest.base_model.fingerprint}); this service serves {base_fingerprint}")
    return candidates
