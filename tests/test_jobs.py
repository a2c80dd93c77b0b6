"""Training jobs through a real redis-server and real `gfn worker` processes: progress,
new-version announcements, SIGKILL recovery from the checkpoint, SIGTERM handing the job back,
cancel, bad configs and failing jobs, a stalled Redis and a job taken for abandoned while it trains."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from redis import Redis
from rq.job import Job
from typer.testing import CliRunner

from adapters.store import AdapterStore
from gfn.cli import app
from gfn.local import free_port
from jobs.announce import CHANNEL, LATEST, NewVersion
from jobs.configs import ConfigError, config_data
from jobs.metrics import OUTCOMES
from jobs.queue import KEEP_S, RETRIES, JobQueue, JobStatus
from jobs.worker import HEARTBEAT_GRACE_S, MONITOR_S, RESTART_S
from jobs.validate import load
from trainer.config import config_errors, load_config

REPO = Path(__file__).resolve().parent.parent
SHORT = ["samples_per_prompt=16", "evaluate=false", "checkpoint_every=2"]


class Workers:
    """`gfn worker` processes on one Redis, with GFN_HOME = `home`; all killed at teardown."""

    def __init__(self, redis_url: str, home: Path):
        self.redis_url, self.home, self.processes = redis_url, home, []

    def start(self, metrics_port: int = 0) -> subprocess.Popen:
        log = open(self.home / f"worker{len(self.processes)}.log", "w")
        process = subprocess.Popen(
            [sys.executable, "-m", "gfn.cli", "worker", "--redis-url", self.redis_url, "--metrics-port", str(metrics_port)],
            cwd=REPO, env={**os.environ, "GFN_HOME": str(self.home)}, stdout=log, stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


@pytest.fixture
def workers(redis_server, tmp_path: Path):
    workers = Workers(redis_server.url, tmp_path)
    yield workers
    workers.kill_all()


@pytest.fixture
def queue(redis_server) -> JobQueue:
    return JobQueue(Redis.from_url(redis_server.url))


def watch(queue: JobQueue, job_id: str, until: Callable[[JobStatus], bool], timeout: float,
          seen: list[JobStatus] | None = None) -> JobStatus:
    """Poll the job's status until `until` holds; every status read is appended to `seen`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = queue.status(job_id)
        if seen is not None:
            seen.append(status)
        if until(status):
            return status
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {status} after {timeout} s")


def steps(seen: list[JobStatus]) -> list[int]:
    return [s.progress.step for s in seen if s.progress is not None]


def children(pid: int, timeout: float = 60) -> list[int]:
    """The process's children, once it has any (a worker's: its job's process), polled every 5 ms."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if found := Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            return [int(child) for child in found]
        time.sleep(0.005)
    raise AssertionError(f"process {pid} started no child in {timeout} s")


def abandon(queue: JobQueue) -> None:
    """What missed heartbeats amount to: the running jobs' entries among the started expire, and an idle
    worker's cleanup acts on them (here at once, not after MONITOR_S + HEARTBEAT_GRACE_S and its next round)."""
    registry = queue.queue.started_job_registry
    queue.redis.zadd(registry.key, {entry: 1 for entry in queue.redis.zrange(registry.key, 0, -1)})
    registry.cleanup()


def trained_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_jobs_package_imports_no_training_code():
    """The service imports jobs/; it must not drag in the trainer, the demo world or torch."""
    code = ("import sys, jobs.queue, jobs.validate, jobs.announce, jobs.worker, jobs.metrics; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'trainer', 'world', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_service_imports_no_training_code():
    """Data flows one way: the service reads adapters and never imports the trainer or the demo world."""
    code = ("import sys, service.app, service.engines.hf, service.engines.vllm, service.engines.vllm_cpu_lora; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'trainer', 'world'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_checked_in_schema_is_current():
    from jobs.configs import SCHEMA
    from trainer.config import schema_json

    assert SCHEMA.read_text() == schema_json(), "configs/schema.json is stale: run `gfn configs schema`"


def test_every_bundled_config_passes_the_schema_and_queues_as_the_same_config():
    """What the queue carries (schema-checked JSON) is the config `gfn train` would train."""
    from jobs.configs import bundled_configs
    from trainer.config import load_config

    for name in bundled_configs():
        assert load_config(load(name)) == load_config(name)
    weights = {"task.target": {"kind": "weights", "weights": {3: 1.0, 7: 2.0}}}
    assert load_config(load("rng", weights)) == load_config("rng", weights)


def test_malformed_config_is_refused_at_submit_naming_the_field(queue: JobQueue, redis_server):
    with pytest.raises(ConfigError) as refused:
        queue.submit(config_data("rng", ["task.target={kind: binomial, n: 20, p: 1.5}", "optim.lerning_rate=0.1"]))
    assert "task.target.p: must be < 1" in refused.value.errors
    assert any(e.startswith("optim.lerning_rate: unknown field") for e in refused.value.errors)
    with pytest.raises(ConfigError, match="task.name: must be one of"):
        load("rng", {"task.name": "nope"})
    for oversized in ("steps=1000000000000", "samples_per_prompt=1000000000", "lora.dropout=0.1", "lora.r=100000",
                      "seed=18446744073709551616", "task.prompt=''"):
        with pytest.raises(ConfigError, match=oversized.partition("=")[0]):  # at submit, not three failures later
            queue.submit(config_data("rng", [oversized]))
    result = CliRunner().invoke(app, ["jobs", "submit", "rng", "--set", "steps=-1", "--redis-url", redis_server.url])
    assert result.exit_code == 2 and "steps: must be > 0" in result.output
    with pytest.raises(ConfigError, match="task.max_len: must be <= 4096"):  # an optional integer: its bound, not "null"
        load("rng", ["task.max_len=100000"])
    with pytest.raises(ConfigError, match="task.prompt: must be valid Unicode text"):  # no tokenizer reads it
        queue.submit(config_data("rng", {"task.prompt": "a \ud800 b"}))
    assert queue.queue.count == 0 and queue.list() == []


@pytest.mark.parametrize("name, overrides, said", [
    ("infill", ["task.min_len=30"], "task: min_len 30 is above max_len 12"),
    ("rng", ["task.min_len=3", "task.max_len=2"], "task: min_len 3 is above max_len 2"),
    ("rng", ["task.target={kind: uniform, low: 150}"], "task.target: low 150 is above high 99"),
    ("rng", ["behaviour.on_policy=0.9"], "behaviour: on_policy + tempered + replay must be 1, got 1.4"),
    ("rng", ["behaviour.temperature_low=3"], "behaviour: temperature_low 3"),
    ("reasoning", ["task.answer_prompt=The answer is"], "task.answer_prompt: must start with the terminator '.'"),
    ("reasoning", ["task.eval_operands=[3, 9]"], "task.eval_operands.1: "),
    ("constrained", ["task.prompt_template=Use {word}"], "task.prompt_template: "),
    ("rng", ["steps=true"], "steps: "),
    ("rng", ["task.max_len=3.0"], "task.max_len: "),
])
def test_rules_between_fields_are_checked_at_submit_as_in_training(name, overrides, said):
    """A rule the sections declare (jobs.rules) refuses a config at submit, in the trainer's words;
    before, the service queued such jobs and the worker failed them."""
    with pytest.raises(ConfigError) as submitted:
        load(name, overrides)
    with pytest.raises(ValidationError) as trained:
        load_config(name, overrides)
    assert any(e.startswith(said) for e in submitted.value.errors), submitted.value.errors
    assert any(e.startswith(said) for e in config_errors(trained.value)), config_errors(trained.value)


def test_the_list_shows_the_newest_queued_jobs(queue: JobQueue):
    ids = [queue.submit(config_data("rng", [f"seed={k}"])) for k in range(3)]  # no worker: they stay queued
    assert [j.id for j in queue.list(limit=1)] == ids[-1:]
    assert [j.id for j in queue.list(limit=2)] == ids[:0:-1]


def test_the_list_shows_a_job_queued_again_first_in_line(queue: JobQueue):
    """A retried or handed-back job goes to the queue's head and runs next: the list must show it."""
    ids = [queue.submit(config_data("rng", [f"seed={k}"])) for k in range(3)]
    again = Job.fetch(ids[0], connection=queue.redis)
    queue.queue.remove(again)
    queue.queue.enqueue_job(again, at_front=True)  # as RQ queues a retry
    assert queue.queue.get_job_ids()[0] == ids[0]
    assert [j.id for j in queue.list(limit=1)] == ids[:1]
    assert [j.id for j in queue.list(limit=2)] == [ids[0], ids[2]]


def test_submitted_job_trains_and_announces_its_version(workers, queue, redis_server, demo_model):
    workers.start()
    announcements = Redis.from_url(redis_server.url).pubsub()
    announcements.subscribe(CHANNEL)
    submit = CliRunner().invoke(app, ["jobs", "submit", "rng", "--redis-url", redis_server.url, "--set", "steps=6",
                                      *(f"--set={s}" for s in SHORT), f"--set=base_model={demo_model}"])
    assert submit.exit_code == 0, submit.output
    job_id = submit.output.strip()

    done = watch(queue, job_id, lambda s: s.status not in ("queued", "started"), 180)
    assert done.status == "finished" and done.adapter == "rng@v1" and done.error is None
    assert done.progress.step == done.progress.total == 6 and done.progress.eta == 0
    assert AdapterStore(workers.home / "adapters").manifest("rng", 1).job_id == job_id
    assert [j.id for j in queue.list()] == [job_id]

    message = announcements.get_message(timeout=5)  # the subscribe confirmation
    message = announcements.get_message(timeout=5)
    assert NewVersion.model_validate_json(message["data"]) == NewVersion(name="rng", version=1, job_id=job_id)
    assert queue.redis.zrange(LATEST, 0, -1, withscores=True) == [(b"rng", 1.0)]  # where a service catches up from
    shown = CliRunner().invoke(app, ["jobs", "status", job_id, "--redis-url", redis_server.url])
    assert json.loads(shown.output)["adapter"] == "rng@v1"


def test_gfn_jobs_cancel_cancels_a_queued_job_and_names_an_unknown_one(redis_server, queue, demo_model):
    def gfn(*args: str):
        return CliRunner().invoke(app, ["jobs", *args, "--redis-url", redis_server.url])

    job_id = gfn("submit", "rng", "--set", f"base_model={demo_model}").output.strip()
    cancelled = gfn("cancel", job_id)
    assert cancelled.exit_code == 0 and json.loads(cancelled.output)["status"] == "cancelled", cancelled.output
    assert queue.status(job_id).status == "cancelled" and queue.queue.count == 0  # no worker will take it
    unknown = gfn("cancel", "no-such-job")
    assert unknown.exit_code == 2 and "no-such-job" in unknown.output, unknown.output


def test_a_worker_waits_for_redis_and_outlives_redis_losing_its_data(workers, queue, redis_server, demo_model):
    """Started before Redis answers, a worker waits for it; when Redis loses its data (flushed, restarted
    without persistence), the worker registers again: its jobs' processes rebuild it from that record."""
    redis_server.stop()
    process = workers.start()
    time.sleep(RESTART_S + 2)
    assert process.poll() is None, (workers.home / "worker0.log").read_text()
    redis_server.start()
    config = load("rng", ["steps=2", f"base_model={demo_model}", *SHORT])
    first = watch(queue, queue.submit(config), lambda s: s.status not in ("queued", "started"), 180)
    assert first.status == "finished", first.error
    queue.redis.flushall()
    second = watch(queue, queue.submit(config), lambda s: s.status not in ("queued", "started"), 180)
    assert second.status == "finished" and second.adapter == "rng@v2", second.error


def test_job_of_a_killed_worker_resumes_from_its_checkpoint_and_stores_one_version(workers, queue, demo_model):
    total = 60  # long enough that the job cannot end between the poll that sees step 3 and the kill
    first = workers.start()
    job_id = queue.submit(load("rng", [f"steps={total}", f"base_model={demo_model}", *SHORT]))
    seen: list[JobStatus] = []
    watch(queue, job_id, lambda s: s.progress is not None and s.progress.step >= 3, 180, seen)
    first.kill()  # SIGKILL: the job's process dies with its worker; checkpoint at step >= 2
    first.wait()
    killed = queue.status(job_id)
    assert killed.status == "started", f"the job ended before its worker was killed ({killed.progress}): lengthen it"
    time.sleep(MONITOR_S + HEARTBEAT_GRACE_S + 2)  # its heartbeat has expired: abandoned, for a worker to requeue
    listed = {j.id: j for j in queue.list()}  # what GET /jobs reads: a read, which leaves that to workers
    assert listed[job_id].status == "started" and listed[job_id].retries_left == RETRIES

    workers.start()
    after: list[JobStatus] = []
    done = watch(queue, job_id, lambda s: s.status not in ("queued", "started"), 240, after)
    assert done.status == "finished" and done.adapter == "rng@v1"
    assert min(steps(after)) >= 3, f"the job restarted from zero: steps seen after the kill {steps(after)}"
    log = [json.loads(line) for line in (workers.home / "runs" / job_id / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, total + 1))
    store = AdapterStore(workers.home / "adapters")
    assert store.versions("rng") == [1] and store.manifest("rng", 1).job_id == job_id
    assert done.retries_left == RETRIES - 1


def test_a_job_cancelled_while_its_worker_died_ends_cancelled_without_training_again(workers, queue, demo_model):
    """RQ retries the dead worker's job; the next worker must see the cancel before it loads anything."""
    first = workers.start()
    job_id = queue.submit(load("rng", ["steps=60", f"base_model={demo_model}", *SHORT]))
    watch(queue, job_id, lambda s: s.progress is not None and s.progress.step >= 3, 180)
    first.kill()
    first.wait()
    assert queue.cancel(job_id).cancel_requested
    run = workers.home / "runs" / job_id
    written = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    time.sleep(MONITOR_S + HEARTBEAT_GRACE_S + 2)  # abandoned: the next worker requeues it and takes it

    workers.start()
    done = watch(queue, job_id, lambda s: s.status not in ("queued", "started"), 120)
    assert done.status == "cancelled" and done.adapter is None and done.error is None, done
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == written, "the retry trained or checkpointed"
    assert AdapterStore(workers.home / "adapters").names() == []


def test_a_stopped_workers_job_checkpoints_and_resumes_on_the_next_without_spending_a_retry(workers, queue,
                                                                                            demo_model):
    """SIGTERM, as `docker stop`, a redeploy or a scale-down send it: the job checkpoints at its next
    step and goes back to the queue, its retries untouched (here none: a retry spent would fail it)."""
    total = 60
    first = workers.start()
    job_id = queue.submit(load("rng", [f"steps={total}", f"base_model={demo_model}", *SHORT]), retries=0)
    watch(queue, job_id, lambda s: s.progress is not None and s.progress.step >= 3, 180)
    first.terminate()
    assert first.wait(60) == 0
    stopped = queue.status(job_id)
    assert stopped.status == "queued" and stopped.retries_left == 0, stopped
    checkpoint = torch.load(workers.home / "runs" / job_id / "checkpoint.pt", weights_only=False)
    assert stopped.progress.step <= checkpoint["step"] < total  # progress is reported once a second

    workers.start()
    after: list[JobStatus] = []
    done = watch(queue, job_id, lambda s: s.status not in ("queued", "started"), 240, after)
    assert done.status == "finished" and done.adapter == "rng@v1", done
    assert steps(after) == sorted(steps(after)), f"the job restarted from zero: steps seen after {steps(after)}"
    log = [json.loads(line) for line in (workers.home / "runs" / job_id / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, total + 1))
    assert AdapterStore(workers.home / "adapters").versions("rng") == [1]


def test_a_worker_stopped_as_its_job_starts_hands_the_job_back_without_spending_a_retry(workers, queue, demo_model):
    """A SIGTERM in the job process's first moments, before it can catch it, ends that process: the
    stop is still the planned one, so the job goes back to the queue, its retries untouched (here none)."""
    first = workers.start()
    job_id = queue.submit(load("rng", ["steps=2", f"base_model={demo_model}", *SHORT]), retries=0)
    children(first.pid)
    first.terminate()
    assert first.wait(60) == 0
    assert "(signal 15)" in (workers.home / "worker0.log").read_text(), "the job's process caught the SIGTERM"
    stopped = queue.status(job_id)
    assert stopped.status == "queued" and stopped.retries_left == 0 and stopped.error is None, stopped
    assert queue.queue.get_job_ids() == [job_id]


def test_a_running_job_trains_on_while_redis_stalls(workers, queue, redis_server, demo_model):
    """Redis stopped (not refusing: calls hang) for a few seconds: the job's steps go on, and its
    progress is saved again soon after Redis answers."""
    workers.start()
    job_id = queue.submit(load("rng", ["steps=300", f"base_model={demo_model}", *SHORT]))
    watch(queue, job_id, lambda s: s.progress is not None and s.progress.step >= 2, 180)
    run = workers.home / "runs" / job_id
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        before = len(trained_steps(run))
        time.sleep(6)
        during = len(trained_steps(run)) - before
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert during >= 5, f"{during} steps trained in 6 s of a stalled Redis"
    watch(queue, job_id, lambda s: s.progress.step > before + during, 15)
    assert queue.cancel(job_id).cancel_requested
    assert watch(queue, job_id, lambda s: s.status != "started", 60).status == "cancelled"


def test_a_job_taken_for_abandoned_stays_with_its_attempt_that_trains_on(workers, queue, demo_model):
    """A worker out of touch with Redis past the heartbeat grace (here stopped, its job's process too)
    has its job queued again by an idle worker. The new attempt finds the run in use and steps aside:
    no retry spent, the job still started; the first attempt is watched again and ends it."""
    first = workers.start()
    job_id = queue.submit(load("rng", ["steps=100", f"base_model={demo_model}", *SHORT]))
    watch(queue, job_id, lambda s: s.progress is not None and s.progress.step >= 2, 180)
    stopped = [first.pid, *children(first.pid)]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        abandon(queue)
        assert queue.status(job_id).retries_left == RETRIES - 1  # queued again
        port = free_port()
        workers.start(metrics_port=port)
        log = workers.home / "worker1.log"
        def stepped_aside(status: JobStatus) -> bool:  # its log line comes just before its retry is given back
            return "another attempt trains on" in log.read_text() and status.retries_left == RETRIES

        seen = watch(queue, job_id, lambda s: stepped_aside(s) or s.status == "failed", 180)
        assert seen.status == "started" and seen.retries_left == RETRIES, seen
        time.sleep(1)  # the worker counts its outcome after the line above
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        ended = [s for f in text_string_to_metric_families(scraped) for s in f.samples if s.name == "gfn:worker_jobs_total"]
        assert {s.labels["status"]: s.value for s in ended} == dict.fromkeys(OUTCOMES, 0.0)  # no outcome: it runs on
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    registry = queue.queue.started_job_registry
    watch(queue, job_id, lambda s: job_id in registry.get_job_ids(cleanup=False) or s.status not in ("queued", "started"),
          6 * MONITOR_S)  # watched again (or, on a loaded machine, already done)
    done = watch(queue, job_id, lambda s: s.status not in ("queued", "started"), 120)
    assert done.status == "finished" and done.adapter == "rng@v1" and done.retries_left == RETRIES, done
    assert trained_steps(workers.home / "runs" / job_id) == list(range(1, 101))


def test_an_attempt_that_finds_its_run_in_use_trains_it_once_the_holder_dies(workers, queue, demo_model):
    """The attempt holding the run dies after RQ queued the job again but before its next heartbeat
    registered it again: the new attempt stepped aside, and the job stayed started, watched by no one.
    The new attempt now waits a heartbeat or two and trains once the run comes free."""
    job_id = queue.submit(load("rng", ["steps=6", f"base_model={demo_model}", *SHORT]))
    run_dir = workers.home / "runs" / job_id
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "w") as held:  # the dying attempt's hold on the run
        fcntl.flock(held, fcntl.LOCK_EX)
        workers.start()
        log = workers.home / "worker0.log"
        watch(queue, job_id, lambda s: "another attempt holds its run" in log.read_text(), 180)
    done = watch(queue, job_id, lambda s: s.status not in ("queued", "started"), 120)
    assert done.status == "finished" and done.adapter == "rng@v1" and done.retries_left == RETRIES, done
    assert trained_steps(run_dir) == list(range(1, 7))


def test_a_job_failed_as_abandoned_while_it_trains_on_can_still_be_cancelled(workers, queue, demo_model):
    """Without retries, the job taken for abandoned is failed while its attempt trains on: a cancel must reach it."""
    first = workers.start()
    job_id = queue.submit(load("rng", ["steps=300", f"base_model={demo_model}", *SHORT]), retries=0)
    watch(queue, job_id, lambda s: s.progress is not None and s.progress.step >= 2, 180)
    os.kill(first.pid, signal.SIGSTOP)  # no heartbeats; its job's process trains on
    try:
        abandon(queue)
        assert queue.status(job_id).status == "failed"
        assert queue.cancel(job_id).cancel_requested
        done = watch(queue, job_id, lambda s: s.status != "failed", 60)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert done.status == "cancelled" and done.error is None, done


def test_cancels_at_the_same_moment_all_answer_cancelled(queue, demo_model):
    for _ in range(10):
        job_id = queue.submit(load("rng", [f"base_model={demo_model}", *SHORT]))
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: queue.cancel(job_id).status, range(4)))
        assert answers == ["cancelled"] * 4


def test_a_job_whose_announcement_fails_still_finishes_with_its_version(workers, queue, redis_server, demo_model):
    """Stored is done: a service that missed the announcement finds the version by polling the store.
    The worker's Redis user may not PUBLISH here, so announcing fails as when Redis goes away."""
    queue.redis.acl_setuser("worker", enabled=True, passwords=["+pw"], commands=["+@all", "-publish"],
                            keys=["~*"], channels=["*"])
    workers.redis_url = redis_server.url.replace("redis://", "redis://worker:pw@")
    workers.start()
    job_id = queue.submit(load("rng", ["steps=2", f"base_model={demo_model}", *SHORT]), retries=0)
    done = watch(queue, job_id, lambda s: s.status not in ("queued", "started"), 180)
    assert done.status == "finished" and done.adapter == "rng@v1", done
    assert queue.redis.zrange(LATEST, 0, -1) == []  # not announced
    assert "but Redis is away to announce it" in (workers.home / "worker0.log").read_text()


def test_running_job_reports_progress_and_stops_at_a_step_boundary_when_cancelled(workers, queue, demo_model):
    port = free_port()
    workers.start(metrics_port=port)
    job_id = queue.submit(load("rng", ["steps=100", f"base_model={demo_model}", *SHORT]))
    running = watch(queue, job_id, lambda s: s.progress is not None and s.progress.step >= 2, 180)
    assert running.status == "started" and running.progress.total == 100 and running.progress.eta > 0
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    samples = {s.name: s for f in text_string_to_metric_families(scraped) for s in f.samples}
    assert samples["gfn:worker_job_step"].labels == {"adapter": "rng"} and samples["gfn:worker_job_step"].value >= 2
    assert samples["gfn:worker_job_steps"].value == 100 and samples["gfn:jobs_running"].value == 1
    assert queue.cancel(job_id).cancel_requested
    done = watch(queue, job_id, lambda s: s.status != "started", 60)
    assert done.status == "cancelled" and done.adapter is None and done.error is None
    checkpoint = torch.load(workers.home / "runs" / job_id / "checkpoint.pt", weights_only=False)
    assert running.progress.step <= checkpoint["step"] < 100
    assert AdapterStore(workers.home / "adapters").names() == []
    assert queue.cancel(job_id).status == "cancelled"


def test_queued_job_cancelled_never_runs(workers, queue, demo_model):
    job_id = queue.submit(load("rng", [f"base_model={demo_model}", *SHORT]))
    cancelled = queue.cancel(job_id)
    assert cancelled.status == "cancelled" and queue.queue.count == 0
    assert cancelled.ended_at is not None and cancelled.ended_at >= cancelled.enqueued_at  # it had no end
    assert 0 < queue.redis.ttl(Job.key_for(job_id)) <= KEEP_S  # kept as long as an ended job, then gone
    workers.start()
    after = queue.submit(load("rng", ["steps=2", f"base_model={demo_model}", *SHORT]))  # queued behind it
    assert watch(queue, after, lambda s: s.status not in ("queued", "started"), 180).status == "finished"
    assert not (workers.home / "runs" / job_id).exists() and job_id not in (workers.home / "worker0.log").read_text()
    assert queue.status(job_id).status == "cancelled"


def test_a_job_refused_at_setup_fails_at_once_with_its_error(workers, queue):
    workers.start()
    job_id = queue.submit(load("rng", ["base_model=/nonexistent/base-model", *SHORT]), retries=2)
    done = watch(queue, job_id, lambda s: s.status not in ("queued", "started"), 180)
    assert done.status == "failed" and done.retries_left == 0
    runs = (workers.home / "worker0.log").read_text().count(f"({job_id})")
    assert runs == 1, f"ran {runs} times: a job refused at setup would fail each retry the same way"
    assert done.error.startswith("FileNotFoundError: ") and "/nonexistent/base-model does not exist" in done.error
    assert queue.list()[0].error == done.error
    short = queue.submit(load("rng", ["task.max_len=1", *SHORT]), retries=2)  # past the schema: its support is read
    done = watch(queue, short, lambda s: s.status not in ("queued", "started"), 180)
    assert done.status == "failed" and (workers.home / "worker0.log").read_text().count(f"({short})") == 1
    assert "task: max_len 1 cannot spell 99" in done.error, done.error
