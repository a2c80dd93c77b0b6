"""`gfn up`, what `make serve` runs: it serves at once, trains the missing demo adapters as jobs
(quickest first), and a terminal's Ctrl-C hands the running job back to the queue, which Redis
keeps for the next start. Real processes throughout: `gfn up`, its redis-server and worker."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from redis import Redis
from service_world import wait_until

from adapters.store import AdapterStore
from gfn.local import DEMO_ADAPTERS, RedisServer, free_port, lora_settings, queue_demo_adapters
from jobs import JobQueue, load
from jobs.queue import RETRIES
from service.settings import Settings
from trainer.config import load_config
from trainer.loop import Trainer

REPO = Path(__file__).resolve().parent.parent


def test_gfn_up_queues_each_missing_demo_adapter_once(redis_server, demo_model, tmp_path, monkeypatch):
    """A second start (Redis kept the queue) queues none again, an adapter the store holds for this
    demo model is not trained again, and a job queued for another build of the demo world is cancelled."""
    monkeypatch.setenv("GFN_HOME", str(tmp_path))
    monkeypatch.delenv("GFN_STORE", raising=False)
    queue = JobQueue(Redis.from_url(redis_server.url))
    stale = queue.submit(load("rng", {"base_model": str(demo_model.parent / "demo-000000000000")}))  # a rebuilt world's
    assert queue_demo_adapters(redis_server.url, demo_model) == list(DEMO_ADAPTERS) == [
        "rng", "reasoning", "infill", "constrained"]
    assert queue.status(stale).status == "cancelled"  # its adapter would never serve on this build
    jobs = queue.queue.get_jobs()
    assert [job.args[0]["name"] for job in jobs] == list(DEMO_ADAPTERS)  # the worker takes them in this order
    assert {job.args[0]["base_model"] for job in jobs} == {str(demo_model)}
    assert queue_demo_adapters(redis_server.url, demo_model) == list(DEMO_ADAPTERS)  # still training
    assert queue.queue.count == len(DEMO_ADAPTERS)  # and none queued twice

    rng = load_config("rng", ["steps=2", "evaluate=false", f"base_model={demo_model}"])
    Trainer(rng, tmp_path / "runs" / "rng", AdapterStore(tmp_path / "adapters"), quiet=True).run()
    for job in jobs:
        queue.cancel(job.id)
    assert queue_demo_adapters(redis_server.url, demo_model) == ["reasoning", "infill", "constrained"]
    assert [job.args[0]["name"] for job in queue.queue.get_jobs()] == ["reasoning", "infill", "constrained"]


def test_gfn_up_sizes_vllm_for_the_adapters_still_to_train():
    """vLLM fixes its LoRA modules and rank at start: the service must know those of the adapters to come."""
    assert lora_settings(["reasoning"], Settings(max_lora_rank=32)) == {
        "lora_target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"], "max_lora_rank": 32}
    wide = lora_settings(["reasoning", "infill"], Settings(lora_target_modules=["c_attn"]))
    assert wide == {"max_lora_rank": 16, "lora_target_modules": [
        "c_attn", "down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]}


def test_gfn_up_serves_at_once_and_a_ctrl_c_hands_the_training_job_back(demo_model, tmp_path):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / demo_model.name).symlink_to(demo_model)  # the built demo world, not a second build
    port, log = free_port(), tmp_path / "up.log"
    env = {**os.environ, "GFN_HOME": str(home), "GFN_BASE_MODEL": str(tmp_path / "own"), "GFN_REDIS_URL": "redis://x"}
    env.pop("GFN_STORE", None)
    up = subprocess.Popen([sys.executable, "-m", "gfn.cli", "up", "--engine", "transformers", "--port", str(port)],
                          cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                          start_new_session=True)  # a process group of its own, as a terminal gives it
    try:
        def ready():
            try:
                return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2))
            except OSError:
                return None
        assert wait_until(ready, 120, "the service answers /ready")["adapters"] == []  # serving before any adapter trained
        url = wait_until(lambda: re.search(r"--redis-url (redis://\S+)", log.read_text()), 10, "the jobs hint").group(1)
        queue = JobQueue(Redis.from_url(url))
        rng = next(job for job in queue.list() if job.name == "rng")
        wait_until(lambda: (s := queue.status(rng.id)).progress is not None and s.progress.step >= 2, 180, "rng trains")
        os.killpg(up.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole process group
        time.sleep(0.5)
        os.killpg(up.pid, signal.SIGINT)  # an impatient second one, while the worker hands its job back
        assert up.wait(120) == 0
    finally:
        if up.poll() is None:
            up.kill()
    example = re.search(r"curl -s \S+/infill .* -d '(.*?)'", log.read_text(), re.DOTALL)
    assert example and json.loads(example.group(1))["n"] == 4  # rich broke a line inside its JSON: as printed, it answered 422
    said = " ".join(log.read_text().split())
    assert "Traceback" not in said and "GFN_BASE_MODEL and GFN_REDIS_URL ignored here" in said  # overridden silently before
    with pytest.raises(OSError):  # its Redis stopped with it
        socket.create_connection(("127.0.0.1", Redis.from_url(url).connection_pool.connection_kwargs["port"]), 2)

    redis = RedisServer(home / "redis", persist=True)  # the next start's Redis reads the same file
    redis.start()
    try:
        queue = JobQueue(Redis.from_url(redis.url))
        jobs = [queue.status(job_id) for job_id in queue.queue.get_job_ids()]  # in the order workers take them
        assert [(job.name, job.status) for job in jobs] == [(name, "queued") for name in DEMO_ADAPTERS]  # rng first
        handed_back = queue.status(rng.id)
        assert handed_back.retries_left == RETRIES  # a planned stop spends no retry
        checkpoint = torch.load(home / "runs" / rng.id / "checkpoint.pt", weights_only=False)
        assert checkpoint["step"] >= 2  # the next start resumes from here
    finally:
        redis.stop()


def test_a_redis_whose_port_another_process_took_is_refused_not_taken_for_started(tmp_path):
    """A listener that took the port since it was found free answered the connect check: the
    worker and the service were then pointed at a port with no Redis behind it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        redis = RedisServer(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="did not start on port"):
            redis.start()
    assert redis.process is None
