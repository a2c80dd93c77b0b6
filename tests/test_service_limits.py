"""Limits and failures through real HTTP (transformers engine): body cap, in-flight cap, timeout,
client disconnect, corrupt and mismatched adapters, and the rationale cache in a real Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
import torch
from service_world import Server, corrupt, metric, save_adapter, task_fields, wait_until

from adapters.models import load_tokenizer
from adapters.store import AdapterStore
from service.app import create_app
from service.logs import JsonFormatter
from service.metrics import Metrics
from service.middleware import RequestContext
from service.settings import Settings

INFILL = {"prefix": "Tom went to the market.", "suffix": "He ate it on the way home."}
QUESTION = {"question": "7 - 2 + 4", "n_rationales": 4, "seed": 5}


@pytest.fixture(scope="module")
def store(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterStore:
    """infill and reasoning (sound), rng (its weights corrupted), alien (trained on another base model)."""
    store = AdapterStore(tmp_path_factory.mktemp("limits") / "adapters")
    fields = task_fields(load_tokenizer(demo_model))
    for seed, name in enumerate(("infill", "reasoning", "rng")):
        save_adapter(store, name, demo_model, fields[name], seed)
    save_adapter(store, "alien", demo_model, fields["infill"], 9, base_fingerprint="sha256:" + "0" * 64)
    corrupt(store, "rng", 1)
    return store


def _settings(store: AdapterStore, demo_model: Path, **overrides) -> Settings:
    return Settings(**{"engine": "transformers", "store": store.root, "base_model": str(demo_model), "torch_threads": 1,
                       "adapters": ["infill", "reasoning", "rng", "alien"], **overrides})


@pytest.fixture(scope="module")
def slow(store, demo_model):
    """Sampling requests wait for a batch for 3 s but may take 1 s: they time out."""
    with Server(create_app(_settings(store, demo_model, max_in_flight=1, max_body_bytes=2048,
                                     batch_wait_ms=3000, request_timeout_s=1.0))) as server:
        yield server


def _metric(server: Server, name: str, **labels: str) -> float:
    with server.client() as client:
        return metric(client, name, **labels)


def test_bodies_over_the_cap_get_413(slow):
    with slow.client() as client:
        big = client.post("/infill", json={**INFILL, "prefix": "x" * 3000})
        assert big.status_code == 413 and "2048" in big.json()["detail"] and big.headers["x-request-id"]
        chunks = (b'{"prefix": "' + b"y" * 1000 for _ in range(3))  # streamed: no content-length
        assert client.post("/infill", content=chunks, headers={"content-type": "application/json"}).status_code == 413
    assert _metric(slow, "gfn:requests_total", endpoint="/infill", status="413") == 2  # refused before routing


def _engine_steps(server: Server) -> float:
    return _metric(server, "gfn:batch_size_count")  # one observation per generation step


def _assert_aborted(server: Server, before: float) -> None:
    """The request left the engine: its batch wait (3 s) passes and the engine takes no step for it."""
    time.sleep(5)
    assert _engine_steps(server) == before, "the engine generated for a request nobody awaits"


def test_slow_requests_time_out_with_504_and_leave_the_engine(slow):
    before = _engine_steps(slow)
    with slow.client() as client:
        response = client.post("/infill", json=INFILL)
    assert response.status_code == 504 and "1 s" in response.json()["detail"]
    _assert_aborted(slow, before)


def test_requests_over_the_in_flight_cap_get_429(slow):
    with slow.client() as client, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: client.post("/infill", json=INFILL), range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 504 in statuses, statuses
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 429)


def test_a_client_that_goes_away_is_dropped_and_its_request_leaves_the_engine(slow):
    before, steps = _metric(slow, "gfn:requests_total", status="499"), _engine_steps(slow)
    with slow.client(timeout=0.2) as client, pytest.raises(httpx.TimeoutException):
        client.post("/infill", json=INFILL)
    deadline = time.time() + 5
    while _metric(slow, "gfn:requests_total", status="499") == before and time.time() < deadline:
        time.sleep(0.05)
    assert _metric(slow, "gfn:requests_total", status="499") == before + 1
    _assert_aborted(slow, steps)


def test_a_client_that_goes_away_while_sending_its_body_is_counted_as_gone(slow):
    """BodyLimit returns without an answer then: the request was counted under status "0"."""
    before = _metric(slow, "gfn:requests_total", endpoint="/infill", status="499")
    host, port = slow.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /infill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prefix\"")
        time.sleep(0.3)
    wait_until(lambda: _metric(slow, "gfn:requests_total", endpoint="/infill", status="499") == before + 1, 10,
               "the request counted as gone")
    assert _metric(slow, "gfn:requests_total", status="0") == 0


def test_an_answer_the_closed_connection_cannot_take_is_counted_as_gone_not_as_a_crash(caplog):
    """uvicorn does not tell a request pipelined behind another that its connection closed: writing
    its answer raises. It was logged as an internal error (with uvicorn's traceback) and counted 200."""

    async def answer(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def closed(message) -> None:
        if message["type"] == "http.response.body":
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    metrics = Metrics()
    scope = {"type": "http", "method": "GET", "path": "/health", "headers": []}
    with caplog.at_level(logging.INFO, logger="gfn.service.access"):
        asyncio.run(RequestContext(answer, metrics, frozenset({"/health"}))(scope, receive, closed))
    assert metrics.requests.labels("/health", "", "499")._value.get() == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_request_ids_are_echoed_and_logged(slow):
    access = logging.getLogger("gfn.service.access")
    access.addHandler(handler := Lines())
    try:
        with slow.client() as client:
            assert client.get("/health", headers={"X-Request-ID": "trace-42"}).headers["x-request-id"] == "trace-42"
            assert len(client.get("/health", headers={"X-Request-ID": "x" * 100}).headers["x-request-id"]) == 32
    finally:
        access.removeHandler(handler)
    lines = [json.loads(line) for line in handler.lines]
    assert any(line["request_id"] == "trace-42" and line["path"] == "/health" and line["status"] == 200
               for line in lines)


def test_corrupt_and_mismatched_adapters_are_refused_and_the_rest_serves(slow):
    with slow.client() as client:
        ready = client.get("/ready").json()
        assert ready["ready"] and ready["adapters"] == ["infill@v1", "reasoning@v1"]
        assert "sha256" in ready["refused"]["rng@v1"] and "another base model" in ready["refused"]["alien@v1"]
        again = client.post("/adapters", json={"name": "rng"})
        assert again.status_code == 409 and "adapter_model.safetensors" in again.json()["detail"]
        alien = client.post("/adapters", json={"name": "alien"})
        assert alien.status_code == 409 and "retrain" in alien.json()["detail"]
        assert client.get("/adapters").json()["refused"].keys() == {"rng@v1", "alien@v1"}


def test_adapters_of_another_base_model_are_listed_from_the_start(store, demo_model):
    """Without GFN_ADAPTERS the newest version of each name on this base model serves; the newest
    of a name on another base is listed at once (the store's poll would only call it new), and
    logged as no error (a store shared by services of several models logged one each per start)."""
    settings = _settings(store, demo_model).model_copy(update={"adapters": None, "watch_poll_s": 3600.0})
    service = logging.getLogger("gfn.service")
    service.addHandler(handler := Lines())
    try:
        with Server(create_app(settings)) as server, server.client() as client:
            ready = client.get("/ready").json()
            alien = client.post("/infill", json={**INFILL, "adapter": "alien"})  # said to load it, in vain
    finally:
        service.removeHandler(handler)
    assert alien.status_code == 404 and "refused (alien@v1: trained on another base model" in alien.text, alien.text
    assert ready["adapters"] == ["infill@v1", "reasoning@v1"]
    assert "another base model" in ready["refused"]["alien@v1"] and "sha256" in ready["refused"]["rng@v1"]
    lines = [json.loads(line) for line in handler.lines]
    levels = {line["adapter"]: line["level"] for line in lines if line["msg"] == "adapter refused"}
    assert levels == {"alien@v1": "info", "rng@v1": "error"}


def test_the_watcher_follows_the_listed_names_only_and_forgets_removed_refusals(demo_model, tmp_path):
    """GFN_ADAPTERS bounds what the service loads, also later; a damaged version deleted from the
    store leaves the refused list; a name with a "." (which peft's names cannot hold) serves."""
    store = AdapterStore(tmp_path / "adapters")
    fields = task_fields(load_tokenizer(demo_model))
    save_adapter(store, "in.fill", demo_model, fields["infill"], 0)
    save_adapter(store, "rng", demo_model, fields["rng"], 1)
    corrupt(store, "rng", 1)
    settings = Settings(engine="transformers", store=store.root, base_model=str(demo_model), torch_threads=1,
                        adapters=["in.fill", "rng", "rng@v7"], watch_poll_s=0.2)
    with Server(create_app(settings)) as server, server.client() as client:
        assert client.get("/ready").json()["refused"].keys() == {"rng@v1", "rng@v7"}
        save_adapter(store, "another", demo_model, fields["infill"], 2)  # not listed: not followed (polled first)
        save_adapter(store, "in.fill", demo_model, fields["infill"], 3)  # listed: v2 goes live
        shutil.rmtree(store.root / "rng" / "v1")
        def settled(ready: dict) -> bool:  # a poll may take in.fill@v2 before the rmtree; the next sees it
            return ready["adapters"] == ["in.fill@v2"] and ready["refused"].keys() == {"rng@v7"}

        deadline = time.time() + 60
        while time.time() < deadline and not settled(client.get("/ready").json()):
            time.sleep(0.2)
        ready = client.get("/ready").json()
        assert ready["adapters"] == ["in.fill@v2"]  # and not another@v1, saved and polled before it
        assert ready["refused"].keys() == {"rng@v7"}  # never stored: still listed
        served = client.post("/infill", json={**INFILL, "adapter": "in.fill", "n": 2, "seed": 0})
        assert served.status_code == 200 and served.json()["adapter"] == "in.fill@v2"


def test_forged_or_early_announcements_neither_end_the_watch_nor_bar_a_version(demo_model, tmp_path, redis_server):
    """A version past what a ref can spell ended every later poll (its refusal could not be read
    back), and an announcement of a version not stored yet barred that version for good."""
    from jobs import CHANNEL, LATEST

    store = AdapterStore(tmp_path / "adapters")
    fields = task_fields(load_tokenizer(demo_model))
    save_adapter(store, "rng", demo_model, fields["rng"], 0)
    settings = Settings(engine="transformers", store=store.root, base_model=str(demo_model), torch_threads=1,
                        redis_url=redis_server.url, watch_poll_s=0.2)
    with Server(create_app(settings)) as server, server.client() as client:
        announcer = redis.Redis.from_url(redis_server.url)
        wait_until(lambda: announcer.pubsub_numsub(CHANNEL)[0][1], 30, "the service subscribes")
        for forged in ({"name": "rng", "version": 3_000_000_000}, {"name": "rng", "version": 2},
                       {"name": "../rng", "version": 1}, {"name": "rng", "version": 0}):
            announcer.publish(CHANNEL, json.dumps(forged))
        announcer.zadd(LATEST, {"../x": 1, "rng": 2})
        time.sleep(1)  # the announcements are read
        save_adapter(store, "rng", demo_model, fields["rng"], 1)  # v2, stored after it was announced
        ready = wait_until(lambda: (r := client.get("/ready").json())["adapters"] == ["rng@v2"] and r, 30, "rng@v2")
        assert ready["refused"] == {}


def test_a_load_refused_while_the_version_retires_leaves_the_operators_unload_standing(demo_model, tmp_path):
    """DELETE /adapters while a request holds the version, then POST /adapters for it (409: it is
    being unloaded): the unload stands, and the watcher, polling the store, does not load it back."""
    store = AdapterStore(tmp_path / "adapters")
    fields = task_fields(load_tokenizer(demo_model))["continuation"]
    long_samples = {**fields, "min_len": 200, "max_len": 200}  # the request outlasts the four calls below, loaded or not
    save_adapter(store, "continuation", demo_model, long_samples, 1)
    settings = Settings(engine="transformers", store=store.root, base_model=str(demo_model), torch_threads=1,
                        max_n=64, watch_poll_s=0.2)
    long = {"adapter": "continuation@v1", "text": "The cat sat.", "n": 64, "temperature": 2.0, "seed": 3}
    with Server(create_app(settings)) as server, server.client() as client, ThreadPoolExecutor(2) as pool:
        def until(state: str) -> None:
            deadline = time.time() + 30
            while not any(a[state] for a in client.get("/adapters").json()["loaded"]):
                assert time.time() < deadline and not running.done(), f"never {state} while the request ran"
                time.sleep(0.01)

        running = pool.submit(client.post, "/generate", json=long)
        until("in_flight")
        deleting = pool.submit(client.delete, "/adapters/continuation/1")
        until("retiring")
        refused = client.post("/adapters", json={"name": "continuation", "version": 1})
        assert refused.status_code == 409 and "being unloaded" in refused.text
        assert running.result().status_code == 200 and deleting.result().json() == {"unloaded": "continuation@v1"}
        time.sleep(1.0)  # five polls of the store
        assert client.get("/adapters").json()["loaded"] == []
        assert client.post("/adapters", json={"name": "continuation", "version": 1}).status_code == 201


def test_a_damaged_newest_version_falls_back_to_the_one_before(demo_model, tmp_path):
    """One bad save must not take a name offline at start; a pinned version gets no substitute."""
    store = AdapterStore(tmp_path / "adapters")
    fields = task_fields(load_tokenizer(demo_model))
    for seed in (0, 1):
        save_adapter(store, "infill", demo_model, fields["infill"], seed)
    corrupt(store, "infill", 2)
    for damage, why in ((None, "sha256"), ("{torn", "manifest.json")):  # its weights, then its manifest too
        if damage:
            (store.root / "infill" / "v2" / "manifest.json").write_text(damage)
        for adapters, served in ((None, ["infill@v1"]), (["infill"], ["infill@v1"]), (["infill@v2"], [])):
            settings = Settings(engine="transformers", store=store.root, base_model=str(demo_model), torch_threads=1,
                                adapters=adapters, watch_poll_s=3600.0)
            with Server(create_app(settings)) as server, server.client() as client:
                ready = client.get("/ready").json()
            assert ready["adapters"] == served and why in ready["refused"]["infill@v2"], (adapters, ready)


def test_rationales_are_cached_in_redis(store, demo_model, redis_server):
    with Server(create_app(_settings(store, demo_model, redis_url=redis_server.url))) as server, \
            server.client() as client:
        assert client.get("/ready").json()["redis"] == "ok"
        first = client.post("/reason", json=QUESTION).json()
        second = client.post("/reason", json=QUESTION).json()
        assert (first["cached"], second["cached"]) == (0, 4) and second["rationales"] == first["rationales"]
        keys = redis.Redis.from_url(redis_server.url).keys("gfn:rationales:*")
        assert len(keys) == 1
        assert _metric(server, "gfn:cache_hits_total") == 1 and _metric(server, "gfn:cache_lookups_total") == 2

        redis_server.stop()  # Redis gone: answers still come, without the cache; /ready says so
        down = client.post("/reason", json=QUESTION)
        assert down.status_code == 200 and down.json()["cached"] == 0
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["redis"].startswith("unreachable")
        redis_server.start()  # back (empty): the cache works again without a restart
        assert client.get("/ready").status_code == 200
        client.post("/reason", json=QUESTION)
        assert client.post("/reason", json=QUESTION).json()["cached"] == 4


def test_a_stopped_engine_fails_health_and_requests_with_503(store, demo_model):
    """/health said ok over a dead engine (so the compose health check never restarted it) and
    requests got a bare 500."""
    with Server(create_app(_settings(store, demo_model))) as server, server.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        server.call(server.state.engine.stop())
        assert client.get("/health").status_code == 503
        reply = client.post("/infill", json={"prefix": "Anna lived in a big city.", "suffix": "She was happy."})
        assert reply.status_code == 503 and "engine was stopped" in reply.json()["detail"], reply.text


def test_a_vllm_engine_whose_core_dies_fails_health_and_requests_with_503(store, demo_model):
    """vLLM's EngineDeadError reached clients as a bare 500, and /health said ok."""
    import multiprocessing
    import os
    import signal

    before = {child.pid for child in multiprocessing.active_children()}
    with Server(create_app(_settings(store, demo_model, engine="vllm"))) as server, server.client() as client:
        assert client.post("/infill", json=INFILL).status_code == 200
        for child in multiprocessing.active_children():
            if child.pid not in before:  # vLLM's engine core
                os.kill(child.pid, signal.SIGKILL)
        wait_until(lambda: client.get("/health").status_code == 503, 60, "/health to see the engine dead")
        reply = client.post("/infill", json=INFILL)
        assert reply.status_code == 503 and "the vLLM engine stopped" in reply.json()["detail"], reply.text


def test_the_token_cap_bounds_requests_that_leave_max_tokens_out(store, demo_model):
    """GFN_MAX_TOKENS capped only an explicit max_tokens: without one, the adapter's max_len was drawn."""
    with Server(create_app(_settings(store, demo_model, max_tokens=3))) as server, server.client() as client:
        body = {"prefix": "Anna lived in a big city.", "suffix": "She was happy.", "n": 8, "seed": 1}
        reply = client.post("/infill", json=body)
        assert reply.status_code == 200 and all(len(s["token_ids"]) <= 3 for s in reply.json()["samples"]), reply.text
        assert client.post("/infill", json={**body, "max_tokens": 4}).status_code == 422


def test_settings_refuse_values_that_are_not_finite(monkeypatch):
    """An infinite batch wait would never end: the engine thread died and `gfn serve` hung at start."""
    from pydantic import ValidationError

    from service.settings import Settings

    for name in ("GFN_BATCH_WAIT_MS", "GFN_WATCH_POLL_S", "GFN_VLLM_KV_CACHE_GIB", "GFN_REQUEST_TIMEOUT_S"):
        monkeypatch.setenv(name, "inf")
        with pytest.raises(ValidationError, match=name.removeprefix("GFN_").lower()):
            Settings()
        monkeypatch.delenv(name)


@pytest.mark.parametrize("name, value, said", [
    ("GFN_TORCH_THREADS", "100000000000", "torch_threads"),  # the engine thread died on it and `gfn serve` hung
    ("GFN_BATCH_WAIT_MS", "1e13", "batch_wait_ms"),  # the same, past the platform's time_t
    ("GFN_CACHE_TTL_S", "100000000000000000", "cache_ttl_s"),  # Redis refused the expiry: pools kept forever
    ("GFN_WATCH_POLL_S", "1e-9", "watch_poll_s"),  # an idle service spun a core
    ("GFN_API_KEY", " ", "api_key"),  # every request without a key matched it
    ("GFN_REDIS_URL", "foo", "redis_url"),  # a traceback after the model loaded
    ("GFN_REDIS_URL", "redis://127.0.0.1:6379/jobs", "redis_url"),  # read as database 0
    ("GFN_REDIS_URL", "redis://127.0.0.1:6379/0?x=1", "redis_url"),  # a traceback every 2 s from the store watch
    ("GFN_LOG_LEVEL", "loud", "log_level"),  # a traceback
    ("GFN_DEVICE", "cuda:99999999999999999999", "device"),  # torch's RuntimeError, a traceback
    pytest.param("GFN_VLLM_BLOCK_SIZE", "16", "vllm_block_size",  # a traceback after the model loaded
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM's CPU attention only")),
])
def test_settings_refuse_values_the_service_would_fail_on_later(monkeypatch, name, value, said):
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert [e["loc"] for e in refused.value.errors()] == [(said,)], refused.value


def test_list_settings_take_commas_or_json(monkeypatch):
    """`GFN_ADAPTERS=rng` was refused as no list; only JSON was taken."""
    from service.settings import Settings

    monkeypatch.setenv("GFN_ADAPTERS", "rng, infill@v3")
    monkeypatch.setenv("GFN_LORA_TARGET_MODULES", '["gate_proj", "up_proj"]')
    settings = Settings()
    assert settings.adapters == ["rng", "infill@v3"] and settings.lora_target_modules == ["gate_proj", "up_proj"]
    monkeypatch.setenv("GFN_ADAPTERS", "")  # an unset shell variable: every stored adapter, not none
    assert Settings().adapters is None


def test_an_empty_store_or_redis_url_setting_means_unset(monkeypatch, tmp_path):
    """`GFN_STORE=$UNSET` served `.` as the store while the CLI read GFN_HOME's."""
    from service.settings import Settings

    monkeypatch.setenv("GFN_HOME", str(tmp_path))
    monkeypatch.setenv("GFN_STORE", "")
    monkeypatch.setenv("GFN_REDIS_URL", "")
    settings = Settings()
    assert settings.store == tmp_path / "adapters" and settings.redis_url is None


def test_a_mistyped_setting_is_named_at_start_with_the_one_meant(monkeypatch, capfd, tmp_path):
    """`GFN_MAX_TOKEN=8` (for GFN_MAX_TOKENS) was skipped in silence: the cap stayed 512, unnoticed."""
    from service.app import create_app
    from service.settings import Settings

    monkeypatch.setenv("GFN_HOME", str(tmp_path))
    monkeypatch.setenv("GFN_MAX_TOKEN", "8")
    monkeypatch.setenv("gfn_redis", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("GFN_API_PORT", "8080")  # docker compose's: known, no warning
    create_app(Settings())
    warned = [line["msg"] for line in map(json.loads, capfd.readouterr().err.splitlines()) if line["level"] == "warning"]
    assert "GFN_MAX_TOKEN is no setting and is ignored: did you mean GFN_MAX_TOKENS?" in warned, warned
    assert "gfn_redis is no setting and is ignored: did you mean GFN_REDIS_URL?" in warned, warned
    assert not [msg for msg in warned if "GFN_API_PORT " in msg or "GFN_HOME " in msg], warned
