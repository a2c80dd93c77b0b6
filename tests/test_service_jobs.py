"""Training jobs through the service (issue 7): a real redis-server, a real `gfn worker`,
the service over real HTTP. A job's adapter goes live without a restart; Redis going away
degrades /jobs and /ready but no inference request; it all recovers by itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from redis import Redis
from service_world import Server, corrupt, save_adapter, task_fields, wait_until

from adapters.models import load_tokenizer
from adapters.store import AdapterStore
from gfn.local import stop_process
from jobs import CHANNEL, NewVersion, announce
from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
RNG = {"adapter": "rng", "n": 4, "seed": 1}


@pytest.fixture
def home(tmp_path: Path, demo_model: Path) -> Path:
    """A GFN_HOME whose store holds rng@v1 (the worker writes v2 there)."""
    store = AdapterStore(tmp_path / "adapters")
    save_adapter(store, "rng", demo_model, task_fields(load_tokenizer(demo_model))["rng"], seed=0)
    return tmp_path


def _server(home: Path, demo_model: Path, redis_url: str | None, poll_s: float = 1.0) -> Server:
    return Server(create_app(Settings(engine="transformers", store=home / "adapters", base_model=str(demo_model),
                                      torch_threads=1, redis_url=redis_url, watch_poll_s=poll_s)))


def test_a_job_trains_and_its_adapter_goes_live(home, demo_model, redis_server):
    worker = subprocess.Popen([sys.executable, "-m", "gfn.cli", "worker", "--redis-url", redis_server.url],
                              cwd=REPO, env={**os.environ, "GFN_HOME": str(home)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # no store poll in the test's time: only the worker's announcement can make v2 live
        with _server(home, demo_model, redis_server.url, poll_s=3600) as server, server.client() as client:
            assert client.post("/generate", json=RNG).json()["adapter"] == "rng@v1"
            overrides = {"steps": 6, "samples_per_prompt": 16, "evaluate": False, "checkpoint_every": 2,
                         "base_model": f"{demo_model}/"}  # the served model, however spelled
            submitted = client.post("/jobs", json={"task": "rng", "overrides": overrides})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            seen = []

            def finished():
                status = client.get(f"/jobs/{job_id}").json()
                seen.append(status)
                return status if status["status"] in ("finished", "failed") else None

            final = wait_until(finished, 300, "the job to finish")
            assert final["status"] == "finished" and final["adapter"] == "rng@v2", final
            assert any(s["progress"] and s["progress"]["total"] == 6 for s in seen)
            assert any(j["id"] == job_id for j in client.get("/jobs").json())
            # the service hears of v2, checks and warms it, then routes "rng" to it; v1 retires
            wait_until(lambda: client.post("/generate", json=RNG).json()["adapter"] == "rng@v2", 60, "rng@v2 to serve")
            wait_until(lambda: [a["ref"] for a in client.get("/adapters").json()["loaded"]] == ["rng@v2"], 30,
                  "rng@v1 to retire")
    finally:
        stop_process(worker)


def test_a_malformed_job_is_refused_naming_the_field(home, demo_model, redis_server):
    with _server(home, demo_model, redis_server.url) as server, server.client() as client:
        typo = client.post("/jobs", json={"task": "rng", "overrides": {"optim.lerning_rate": 0.1}})
        assert typo.status_code == 422 and "lerning_rate" in typo.text
        bad = client.post("/jobs", json={"task": "rng", "overrides": {"task.target": {"kind": "binomial", "p": 2}}})
        assert bad.status_code == 422 and "task.target" in bad.text
        unknown = client.post("/jobs", json={"task": "poetry"})
        assert unknown.status_code == 422 and "task" in unknown.text
        taken = client.post("/jobs", json={"task": "infill", "overrides": {"name": "rng"}})  # rng@v1 is an rng adapter
        assert taken.status_code == 422 and "keeps one task" in taken.text
        relative = client.post("/jobs", json={"task": "continuation", "overrides": {"task.data": "data.jsonl"}})
        assert relative.status_code == 422 and "task.data: give an absolute path" in relative.text, relative.text
        for other in ("/other/model", "~nosuchuser/m", "a\u0000b"):  # the last two cannot even be resolved
            elsewhere = client.post("/jobs", json={"task": "rng", "overrides": {"base_model": other}})
            assert elsewhere.status_code == 422 and "overrides" in elsewhere.text and str(demo_model) in elsewhere.text
        assert client.get("/jobs/no-such-job").status_code == 404
        for overrides, field in (({"barred_flow_offset": float("inf")}, "barred_flow_offset"),
                                 ({"task.min_len": -1}, "task.min_len"), ({"a." * 2000 + "b": 1}, "nested"),
                                 ({"task.min_len": 30}, "task: min_len 30 is above max_len 12")):
            refused = client.post("/jobs", content=json.dumps({"task": "infill", "overrides": overrides}),
                                  headers={"content-type": "application/json"})  # Python's JSON writes inf as Infinity
            assert refused.status_code == 422 and field in refused.text, refused.text
            json.loads(refused.text, parse_constant=lambda c: pytest.fail(f"echoes a bare {c}: not strict JSON"))


def test_queued_jobs_are_listed_newest_first_and_cancelled_over_http(home, demo_model, redis_server):
    with _server(home, demo_model, redis_server.url) as server, server.client() as client:  # no worker: they stay queued
        ids = [client.post("/jobs", json={"task": "rng", "overrides": {"seed": k}}).json()["id"] for k in range(3)]
        assert [j["id"] for j in client.get("/jobs", params={"limit": 2}).json()] == ids[:0:-1]
        assert client.get("/jobs", params={"limit": 0}).status_code == 422
        cancelled = client.delete(f"/jobs/{ids[0]}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert client.get(f"/jobs/{ids[0]}").json()["status"] == "cancelled"
        assert client.delete("/jobs/no-such-job").status_code == 404


def test_redis_going_away_degrades_jobs_but_no_inference(home, demo_model, redis_server):
    with _server(home, demo_model, redis_server.url) as server, server.client() as client:
        assert client.get("/jobs").status_code == 200
        redis_server.stop()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client.post("/generate", json=RNG).status_code, range(16)))
        assert answers == [200] * 16
        down = client.post("/jobs", json={"task": "rng"})
        assert down.status_code == 503 and "Redis" in down.json()["detail"]
        ready = client.get("/ready")
        assert ready.status_code == 503 and "/jobs unavailable" in ready.json()["redis"]
        redis_server.start()
        assert client.get("/jobs").status_code == 200
        assert client.get("/ready").status_code == 200


def test_without_redis_jobs_answer_503_and_inference_serves(home, demo_model):
    with _server(home, demo_model, None) as server, server.client() as client:
        assert client.post("/generate", json=RNG).status_code == 200
        refused = client.post("/jobs", json={"task": "rng"})
        assert refused.status_code == 503 and "GFN_REDIS_URL" in refused.json()["detail"]


def test_the_store_watch_leaves_an_unloaded_version_out_and_goes_on(home, demo_model):
    """An operator's unload holds (the poll does not load the version back); a newer version
    still goes live; naming the unloaded one in POST /adapters brings it back."""
    store = AdapterStore(home / "adapters")
    with _server(home, demo_model, None) as server, server.client() as client:
        assert client.delete("/adapters/rng/1").json() == {"unloaded": "rng@v1"}
        server.call(server.state.watcher.offer("rng", 1))  # what every poll does
        assert client.get("/adapters").json()["loaded"] == []
        save_adapter(store, "rng", demo_model, task_fields(load_tokenizer(demo_model))["rng"], seed=1)
        wait_until(lambda: client.post("/generate", json=RNG).json().get("adapter") == "rng@v2", 30, "rng@v2 to serve")
        assert client.post("/adapters", json={"name": "rng", "version": 1}).status_code == 201
        assert {a["ref"] for a in client.get("/adapters").json()["loaded"]} == {"rng@v1", "rng@v2"}



def test_announced_versions_go_live_and_a_bad_one_is_listed_as_refused(home, demo_model, redis_server):
    """Through announcements alone (no store poll): a malformed message is ignored, a corrupt
    new version is refused (listed in /ready, v1 keeps serving), the next good one goes live."""
    store, fields = AdapterStore(home / "adapters"), task_fields(load_tokenizer(demo_model))["rng"]
    redis = Redis.from_url(redis_server.url)
    with _server(home, demo_model, redis_server.url, poll_s=3600) as server, server.client() as client:
        redis.publish(CHANNEL, b"not an announcement")
        save_adapter(store, "rng", demo_model, fields, seed=1)
        corrupt(store, "rng", 2)
        announce(redis, NewVersion(name="rng", version=2))
        refused = wait_until(lambda: client.get("/ready").json()["refused"], 30, "rng@v2 to be refused")
        assert list(refused) == ["rng@v2"] and "sha256" in refused["rng@v2"]
        assert client.get("/adapters").json()["refused"] == refused
        assert client.post("/generate", json=RNG).json()["adapter"] == "rng@v1"
        save_adapter(store, "rng", demo_model, fields, seed=2)
        announce(redis, NewVersion(name="rng", version=3))
        wait_until(lambda: client.post("/generate", json=RNG).json()["adapter"] == "rng@v3", 30, "rng@v3 to serve")
