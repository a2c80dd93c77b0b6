"""The loaded adapter versions: which version a name routes to, who uses each, safe unloading.

Loading checks the version in the store (checksums and base-model fingerprint), hands it to
the engine, warms it with one request, and only then routes its name to it: a corrupt,
mismatched or refused version is never routed and the others keep serving. A name routes to
its newest loaded version; older versions that are not pinned retire then. A retiring
version takes no new requests and leaves the engine once its last request has finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from adapters.manifest import Manifest
from adapters.store import AdapterStore, parse_ref
from service.engines.base import Engine, GenRequest
from service.errors import AdapterBusy, AdapterRefused, AdapterUnavailable
from service.metrics import Metrics

log = logging.getLogger("gfn.service")


@dataclass(eq=False)
class Entry:
    manifest: Manifest
    pinned: bool = False
    in_flight: int = 0
    retiring: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


class Registry:
    def __init__(self, store: AdapterStore, engine: Engine, base_fingerprint: str, base_tokenizer: str,
                 metrics: Metrics, refused: dict[str, str]):
        self.store, self.engine, self.metrics = store, engine, metrics
        self.refused = refused  # the service's: ref -> why it does not serve
        self.base_fingerprint, self.base_tokenizer = base_fingerprint, base_tokenizer
        self.entries: dict[str, Entry] = {}
        self.unloaded: set[str] = set()  # refs an operator unloaded: the watcher leaves them out
        self._lock = asyncio.Lock()  # one engine change at a time
        self._retiring: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ routing
    def routed(self, name: str) -> Entry | None:
        """The newest loaded version of ``name`` that is not retiring."""
        live = [e for e in self.entries.values() if e.manifest.name == name and not e.retiring]
        return max(live, key=lambda e: e.manifest.version, default=None)

    def resolve(self, adapter: str | None, task: str) -> Entry:
        """``name`` (its routed version), ``name@vN`` (that version), or None (the task's default)."""
        if adapter is None:
            return self._default(task)
        _, version = parse_ref(adapter)
        entry = self.entries.get(adapter) if version else self.routed(adapter)
        if entry is None or entry.retiring:
            why = [f"{ref}: {reason}" for ref, reason in self.refused.items() if ref == adapter or
                   (not version and ref.startswith(f"{adapter}@v"))]
            fix = f"refused ({'; '.join(why)})" if why else "POST /adapters loads a stored one"
            raise AdapterUnavailable(
                f"adapter {adapter!r} is not loaded; loaded: {', '.join(self.live_refs()) or 'none'} ({fix})")
        return entry

    def _default(self, task: str) -> Entry:
        """The adapter named after the task, else the newest trained adapter of the task."""
        routed = [e for name in {e.manifest.name for e in self.entries.values()} if (e := self.routed(name))]
        candidates = [e for e in routed if e.manifest.task == task]
        if not candidates:
            raise AdapterUnavailable(f"no {task} adapter is loaded; name one in 'adapter' or load one (POST /adapters)")
        named = [e for e in candidates if e.manifest.name == task]
        return named[0] if named else max(candidates, key=lambda e: e.manifest.created_at)

    def live_refs(self) -> list[str]:
        """The versions loaded and not retiring: those a request may name."""
        return sorted(ref for ref, e in self.entries.items() if not e.retiring)

    @contextmanager
    def use(self, adapter: str | None, task: str) -> Iterator[Entry]:
        """Resolve and hold a version for one request: it cannot leave the engine meanwhile."""
        entry = self.resolve(adapter, task)
        entry.in_flight += 1
        entry.idle.clear()
        try:
            yield entry
        finally:
            entry.in_flight -= 1
            if entry.in_flight == 0:
                entry.idle.set()

    # ------------------------------------------------------------------ loading
    async def load(self, name: str, version: int | None = None, pin: bool | None = None) -> tuple[Entry, bool]:
        """Check, load, warm, then route: the entry, and whether this call loaded it (not a call before,
        nor one running beside it); raises AdapterError or AdapterRefused (nothing changes then).
        ``pin`` True or False sets the version's pin (unpinned, a version its name no longer routes to
        retires once idle); None leaves a loaded version's as it is and loads a new one unpinned."""
        async with self._lock:
            started = time.perf_counter()
            adapter = await asyncio.to_thread(self.store.load, name, version, self.base_fingerprint,
                                              self.base_tokenizer)
            manifest = adapter.manifest
            entry = self.entries.get(manifest.ref)
            if entry is not None and entry.retiring:  # refused: an operator's unload stands, the watcher keeps off it
                raise AdapterBusy(f"adapter {manifest.ref} is being unloaded; load it again when that is done")
            if entry is not None:
                if pin is not None and entry.pinned != pin:
                    entry.pinned = pin
                    if not pin and self.routed(manifest.name) is not entry:
                        self._retire_soon(entry)
                return entry, False
            if manifest.base_model.dtype != self.engine.dtype:
                log.warning("adapter trained in another dtype", extra={
                    "adapter": manifest.ref, "trained": manifest.base_model.dtype, "served": self.engine.dtype,
                    "effect": "its log-probs differ from training's by the rounding of the two"})
            await self.engine.add_adapter(adapter)
            try:
                await self._warm(manifest)
            except Exception as error:
                await self.engine.remove_adapter(manifest.ref)
                raise AdapterRefused(f"adapter {manifest.ref} failed its warm-up request: {error}") from error
            previous = self.routed(manifest.name)
            entry = self.entries[manifest.ref] = Entry(manifest, pinned=bool(pin))
            self.unloaded.discard(manifest.ref)  # asked for again, and loaded
            self.metrics.adapter_info.labels(manifest.name, str(manifest.version), str(manifest.lora.r)).set(1)
            self.metrics.adapter_loaded(manifest.name)
            self.metrics.adapter_load.observe(time.perf_counter() - started)
        if previous is not None and not previous.pinned and previous.manifest.version < manifest.version:
            self._retire_soon(previous)
        return entry, True

    def _retire_soon(self, entry: Entry) -> None:
        """Retire a version in the background: it leaves once its in-flight requests have finished."""
        task = asyncio.create_task(self._retire(entry))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _warm(self, manifest: Manifest) -> None:
        """One tiny request through the engine, so that a broken adapter fails here, not in a user's request."""
        await self.engine.generate([GenRequest(
            prompt_ids=[manifest.terminator_id], adapter=manifest.ref, terminator_id=manifest.terminator_id,
            max_tokens=1, mask=manifest.mask)])

    async def unload(self, ref: str) -> None:
        """Retire a version and return once it has left the engine (after its in-flight requests);
        the watcher does not load it again (a POST /adapters naming it does)."""
        entry = self.entries.get(ref)
        if entry is None:
            raise AdapterUnavailable(f"adapter {ref!r} is not loaded; loaded: {', '.join(self.live_refs()) or 'none'}")
        self.unloaded.add(ref)
        await self._retire(entry)

    async def _retire(self, entry: Entry) -> None:
        entry.retiring = True
        await entry.idle.wait()
        ref = entry.manifest.ref
        async with self._lock:
            if self.entries.get(ref) is not entry:  # a concurrent unload got there first
                return
            await self.engine.remove_adapter(ref)
            del self.entries[ref]
            manifest = entry.manifest
            self.metrics.adapter_info.remove(manifest.name, str(manifest.version), str(manifest.lora.r))

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
