"""The rationale cache: pools of sampled rationales per adapter version, question and sampling settings.

A pool only grows: a request for n rationales takes the first n, and the caller samples and
appends what is missing, but only onto the pool it saw: two requests that both found the pool
short sample the same seeds, and only the first one's rationales join it. The key holds the
adapter version and its weights' sha256, so versions (and stores sharing one Redis) never mix.
Pools live in Redis (a list per key, with an expiry) when a URL is configured, so that service
processes share them, else in an in-process LRU bounded by the rationales it holds (a bound on
questions let seeded pools of 64 grow it to 600 MiB). A failing Redis never fails a request: the
cache is bypassed, counted in ``gfn:cache_errors_total``, and used again once Redis answers. A pool
that does not read as rationales (written by another release, or by hand) is dropped the same way,
and drawn anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError, ResponseError

from adapters.manifest import Manifest
from adapters.store import WEIGHTS
from service.metrics import Metrics
from service.schemas import Rationale

log = logging.getLogger("gfn.service.cache")
REDIS_TIMEOUT_S = 0.5
"""Per Redis call: a dead Redis costs a request at most this much."""
_APPEND = """
if redis.call('LLEN', KEYS[1]) ~= tonumber(ARGV[1]) then return 0 end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 4))
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


class RationaleCache:
    def __init__(self, metrics: Metrics, redis_url: str | None = None, size: int = 4096, max_pool: int = 64,
                 ttl_s: int = 7 * 24 * 3600):
        self.metrics, self.size, self.max_pool, self.ttl_s = metrics, size, max_pool, ttl_s
        self._memory: OrderedDict[str, list[Rationale]] = OrderedDict()
        self._held = 0  # rationales in _memory: at most `size`
        self._redis = (aioredis.Redis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                               socket_connect_timeout=REDIS_TIMEOUT_S) if redis_url else None)
        self._append = self._redis.register_script(_APPEND) if self._redis else None

    @staticmethod
    def key(manifest: Manifest, question: str, sampling: dict[str, Any], engine: str) -> str:
        """By ref and weights (services with different stores may share one Redis), and a seeded
        pool by engine too (its name and dtype): a seed draws alike on one engine only."""
        by = [manifest.ref, manifest.files[WEIGHTS], question, sampling]
        blob = json.dumps(by if sampling.get("seed") is None else [*by, engine], sort_keys=True)
        return "gfn:rationales:" + hashlib.sha256(blob.encode()).hexdigest()

    async def take(self, key: str, n: int, adapter: str) -> list[Rationale]:
        """Up to ``n`` pooled rationales, oldest first; counted under the adapter's name."""
        self.metrics.cache_lookups.labels(adapter).inc()
        if self._redis is None:
            pool = self._memory.get(key, [])[:n]
            if key in self._memory:
                self._memory.move_to_end(key)
        else:
            try:
                pool = [Rationale.model_validate_json(item) for item in await self._redis.lrange(key, 0, n - 1)]
            except (ValidationError, ResponseError) as error:  # not rationales, or no list (WRONGTYPE)
                self._bypass("read", error)
                await self._drop(key)
                return []
            except (RedisError, OSError) as error:
                self._bypass("read", error)
                return []
        if len(pool) >= n:
            self.metrics.cache_hits.labels(adapter).inc()
        return pool

    async def add(self, key: str, items: list[Rationale], after: int) -> None:
        """Append to a pool that still holds ``after`` items, what ``take`` gave (kept to
        ``max_pool`` items); else leave it: another request has grown it meanwhile."""
        if not items:
            return
        if self._redis is None:
            pool = self._memory.get(key, [])
            if len(pool) == after:
                self._memory[key] = grown = (pool + items)[: self.max_pool]
                self._memory.move_to_end(key)
                self._held += len(grown) - len(pool)
                while self._held > self.size:  # the least recently used pools go first, this one last
                    self._held -= len(self._memory.popitem(last=False)[1])
            return
        try:
            await self._append(keys=[key], args=[after, self.max_pool, self.ttl_s, *(r.model_dump_json() for r in items)])
        except (RedisError, OSError) as error:
            self._bypass("write", error)

    async def _drop(self, key: str) -> None:
        """Delete an unreadable pool, so that the next request's rationales start it again."""
        try:
            await self._redis.delete(key)
        except (RedisError, OSError) as error:
            self._bypass("drop", error)

    async def ping(self) -> bool | None:
        """Whether Redis answers; None when the cache is in process."""
        if self._redis is None:
            return None
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def _bypass(self, operation: str, error: Exception) -> None:
        self.metrics.cache_errors.inc()
        log.warning("rationale cache bypassed", extra={"operation": operation, "error": str(error)})
