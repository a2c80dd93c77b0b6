"""Adapter versions go live as they are written: the worker announces each new version on
Redis pub/sub (jobs.announce), and a poll of the store catches whatever the announcement
missed (Redis down, a version saved by `gfn train`). Loading goes through the registry:
checked, warmed, then routed; requests already running finish on their version, and the
old version leaves once idle unless pinned. With GFN_ADAPTERS set, only the names it lists are
followed (the operator sized the engine for them). A refused version that leaves the store
leaves the refused list."""

from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from adapters.errors import AdapterError, AdapterNotFound
from adapters.store import AdapterStore, format_ref, parse_ref
from jobs import CHANNEL, LATEST, NewVersion
from service.errors import AdapterBusy, AdapterRefused
from service.registry import Registry

log = logging.getLogger("gfn.service")


class AdapterWatcher:
    def __init__(self, registry: Registry, store: AdapterStore, redis_url: str | None, poll_s: float,
                 refused: dict[str, str], names: frozenset[str] | None = None):
        self.registry, self.store, self.redis_url, self.poll_s = registry, store, redis_url, poll_s
        self.refused = refused  # ref -> why it failed to load for good (the service's, shown in /ready); not retried
        self.names = names  # the names followed; None: every name in the store
        self._stored: dict[str, list[int]] = {}  # name -> versions, at the last poll
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._stored = {name: self.store.versions(name) for name in self.store.names()}  # what start-up saw
        self._tasks.append(asyncio.create_task(self._poll()))
        if self.redis_url:
            self._tasks.append(asyncio.create_task(self._subscribe()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def offer(self, name: str, version: int) -> None:
        """Load `name@v{version}` when it is newer than what `name` routes to."""
        routed, ref = self.registry.routed(name), format_ref(name, version)
        if (self.names is not None and name not in self.names) or (routed is not None and routed.manifest.version >= version) or ref in self.refused or ref in self.registry.unloaded:
            return
        try:
            await self.registry.load(name, version)
            log.info("adapter version live", extra={"adapter": ref})
        except AdapterBusy as error:  # offered again by the next poll
            log.info("new adapter version deferred", extra={"adapter": ref, "reason": str(error)})
        except AdapterNotFound:  # announced, not stored (yet): the poll offers it once it is
            log.info("announced adapter version not in the store", extra={"adapter": ref})
        except (AdapterError, AdapterRefused) as error:
            self.refused[ref] = str(error)
            log.warning("new adapter version refused", extra={"adapter": ref, "reason": str(error)})
        except Exception:  # e.g. the version deleted while it was checked: the watch goes on
            log.exception("new adapter version failed to load", extra={"adapter": ref})

    async def _offer_announced(self, announced: bytes | dict) -> None:
        """Offer an announced version; a malformed one (no ref could name it) is logged and ignored."""
        try:
            new = (NewVersion.model_validate_json(announced) if isinstance(announced, bytes)
                   else NewVersion.model_validate(announced))
        except ValidationError:
            log.warning("malformed announcement ignored", extra={"data": repr(announced)[:200]})
            return
        await self.offer(new.name, new.version)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                versions = await asyncio.to_thread(lambda: {n: self.store.versions(n) for n in self.store.names()})
            except (AdapterError, OSError) as error:
                log.warning("store poll failed", extra={"reason": str(error)})
                continue
            try:
                for ref in [r for r in self.refused if _removed(r, self._stored, versions)]:
                    del self.refused[ref]
                self._stored = versions
                for name, stored in versions.items():
                    if stored:
                        await self.offer(name, stored[-1])
            except Exception:  # a bug must not end the watch for the service's lifetime
                log.exception("store poll failed")

    async def _subscribe(self) -> None:
        """Listen for announcements; after every (re)connection, catch up from the latest-versions key."""
        while True:
            client = Redis.from_url(self.redis_url, socket_connect_timeout=2)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    for name, version in await client.zrange(LATEST, 0, -1, withscores=True):
                        await self._offer_announced({"name": name.decode(errors="replace"), "version": version})
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            await self._offer_announced(message["data"])
            except (RedisError, OSError):
                await asyncio.sleep(2)
            except Exception:  # a bug must not end the subscription for the service's lifetime
                log.exception("adapter announcements: subscription failed; reconnecting")
                await asyncio.sleep(2)
            finally:
                await client.aclose()


def _removed(ref: str, before: dict[str, list[int]], now: dict[str, list[int]]) -> bool:
    """Whether ``name@vN`` was in the store at the last poll and is not now (a version asked for
    in GFN_ADAPTERS that never existed stays listed)."""
    name, version = parse_ref(ref)
    return version in before.get(name, []) and version not in now.get(name, [])
