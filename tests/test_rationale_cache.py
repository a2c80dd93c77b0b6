"""The rationale cache's pools under concurrent requests (in process and in a real Redis), and
the bridge that lets adapters.reasoning call the engine: work for a request that ended stops."""

from __future__ import annotations

import asyncio

import pytest
from service_world import save_adapter, task_fields

from adapters.models import load_tokenizer
from adapters.store import AdapterStore
from service.cache import RationaleCache
from service.metrics import Metrics
from service.reasoning import _Bridge
from service.schemas import Rationale


def _rationales(tag: str, n: int) -> list[Rationale]:
    return [Rationale(text=f"{tag}{i}", steps=[], answer=i, log_q=-1.0, log_p_answer=None) for i in range(n)]


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_pool_grows_only_from_what_was_seen(backend, request):
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None

    async def scenario() -> list[str]:
        cache = RationaleCache(Metrics(), url)
        first, second = await cache.take("k", 3, "a"), await cache.take("k", 3, "a")
        assert first == second == []
        await cache.add("k", _rationales("a", 3), after=len(first))  # both found the pool empty and
        await cache.add("k", _rationales("b", 3), after=len(second))  # drew the same seeds: one pool
        await cache.add("k", _rationales("c", 2), after=0)  # a failed read saw nothing: not appended
        grown = await cache.take("k", 5, "a")
        await cache.add("k", _rationales("d", 2), after=len(grown))  # seeds 3, 4 continue the pool
        pool = await cache.take("k", 10, "a")
        await cache.close()
        return [r.text for r in pool]

    assert asyncio.run(scenario()) == ["a0", "a1", "a2", "d0", "d1"]


def test_the_in_process_cache_is_bounded_by_the_rationales_it_holds():
    """It was bounded by questions: seeded pools of 64 rationales grew it to 600 MiB."""

    async def scenario() -> list[int]:
        cache = RationaleCache(Metrics(), size=10, max_pool=8)
        await cache.add("a", _rationales("a", 4), after=0)
        await cache.add("b", _rationales("b", 4), after=0)
        await cache.take("a", 1, "x")  # a is used again: b is now the least recent
        await cache.add("a", _rationales("a", 4), after=4)  # a grows to 8 (its cap): 12 held, b leaves
        await cache.add("c", _rationales("c", 2), after=0)  # 10 held: all stay
        return [len(await cache.take(key, 10, "x")) for key in "abc"]

    assert asyncio.run(scenario()) == [8, 0, 2]


@pytest.mark.parametrize("damage", ["an older format", "not a list"])
def test_a_pool_that_does_not_read_as_rationales_is_drawn_anew(redis_server, damage):
    """An entry another release (or a hand) wrote must not fail every request for its question; a
    key that is no list (WRONGTYPE) was bypassed by every request, and kept forever."""
    from redis import Redis

    async def scenario() -> tuple[list[str], list[str], float]:
        metrics = Metrics()
        cache = RationaleCache(metrics, redis_server.url)
        await cache.add("k", _rationales("a", 2), after=0)
        if damage == "an older format":
            Redis.from_url(redis_server.url).lset("k", 1, '{"text": "an older format"}')
        else:
            Redis.from_url(redis_server.url).set("k", "x")
        missed = await cache.take("k", 2, "a")
        await cache.add("k", _rationales("b", 2), after=len(missed))
        pool = await cache.take("k", 2, "a")
        await cache.close()
        return missed, [r.text for r in pool], metrics.cache_errors._value.get()

    missed, pool, errors = asyncio.run(scenario())
    assert missed == [] and pool == ["b0", "b1"] and errors == 1


def test_closing_the_bridge_cancels_the_engine_call_a_thread_waits_on():
    async def scenario() -> tuple[bool, type]:
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def engine_call() -> None:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        bridge = _Bridge()
        thread = asyncio.ensure_future(asyncio.to_thread(bridge(engine_call)))
        await started.wait()
        bridge.close()  # what a timed-out or abandoned request does
        await asyncio.wait_for(cancelled.wait(), 5)
        with pytest.raises(BaseException) as error:
            await asyncio.wait_for(thread, 5)  # the thread is released, not left waiting
        return cancelled.is_set(), error.type

    cancelled, error = asyncio.run(scenario())
    assert cancelled and error.__name__ == "CancelledError"


def test_a_closed_bridge_refuses_new_calls():
    async def scenario() -> None:
        bridge = _Bridge()
        bridge.close()

        async def engine_call() -> int:
            return 1

        with pytest.raises(asyncio.CancelledError):
            await asyncio.to_thread(bridge(engine_call))

    asyncio.run(scenario())


def test_a_seeded_pool_is_one_engines_an_unseeded_one_every_engines(tmp_path, demo_model):
    """A seed draws alike on one engine only: a vLLM service's seeded pool answered a transformers one."""
    fields = task_fields(load_tokenizer(demo_model))["reasoning"]
    manifest = save_adapter(AdapterStore(tmp_path), "reasoning", demo_model, fields, seed=0)
    seeded, unseeded = {"temperature": 1.0, "max_tokens": None, "seed": 0}, {"temperature": 1.0, "seed": None}
    assert RationaleCache.key(manifest, "Q", seeded, "vllm") != RationaleCache.key(manifest, "Q", seeded, "transformers")
    assert RationaleCache.key(manifest, "Q", unseeded, "vllm") == RationaleCache.key(manifest, "Q", unseeded, "hf")
