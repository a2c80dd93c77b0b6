"""The training job a `gfn worker` runs: one queued config, trained to an adapter version.

Its run directory is `runs/<job id>`, so a job retried after its worker died resumes from
its checkpoint, and the store maps the job id to at most one version. Progress goes to
the job's meta (read by `JobQueue.status`), at most every PROGRESS_EVERY_S; the cancel
flag, and whether its worker is stopping, are read at every step boundary. While Redis is
away the job trains on, unobserved: those reads and writes wait at most QUICK_S, and after
a failed one Redis is left alone for AWAY_S.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from redis import ConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from rq import get_current_job
from rq.connections import get_connection_kwargs
from rq.job import Job

from adapters.home import runs_root, store_root
from adapters.store import AdapterStore
from jobs.announce import NewVersion, announce
from jobs.queue import AnotherAttempt, Interrupted, JobRefused, cancel_requested, save_progress
from jobs.worker import MONITOR_S, stopping
from trainer.config import TrainConfig, config_errors
from trainer.loop import RunInUse, Trainer

PROGRESS_EVERY_S = 1.0
QUICK_S = 0.2  # the longest a step waits on Redis (for the cancel flag, to save progress)
AWAY_S = 5.0  # after a Redis call failed, the job leaves Redis alone this long
LIVE_ATTEMPT_S = 2 * MONITOR_S + 2  # a live attempt holding the run registers again within MONITOR_S
log = logging.getLogger("rq.worker")  # the job's lines beside its worker's


def run_job(config: dict[str, Any]) -> dict[str, Any]:
    """Train `config`; returns {"adapter": "name@vN"}, or {"cancelled": True, "step": n}
    when cancelled (after a checkpoint)."""
    job = get_current_job()
    watch = _Watch(job)
    if watch.cancelled():  # cancelled while its last worker died: RQ retried it; stop before loading anything
        return {"cancelled": True, "step": (job.meta.get("progress") or {}).get("step", 0)}
    try:  # the cross-field rules the schema cannot check, a missing base model, data, a damaged run
        trainer = _claim_run(job, lambda: Trainer(
            TrainConfig.model_validate(config), runs_root() / job.id, AdapterStore(store_root()), job_id=job.id,
            on_progress=watch.report, should_stop=lambda: watch.cancelled() or stopping(), quiet=True,
        ))
    except (ValueError, FileNotFoundError) as error:  # the config, its data, the base model: a retry fails alike
        raise JobRefused(f"{type(error).__name__}: {_one_line(error)}") from error
    try:
        manifest = trainer.run()
    except FloatingPointError as error:  # a setting too extreme: the retry, from the same checkpoint, fails alike
        raise JobRefused(f"{type(error).__name__}: {_one_line(error)}") from error
    if manifest is None and not watch.cancelled():  # its worker is stopping: the next one resumes it
        raise Interrupted(f"the worker stopped; the job resumes from its checkpoint at step {trainer.step}")
    if manifest is None:
        return {"cancelled": True, "step": trainer.step}
    try:  # stored is done: a service that misses the announcement finds the version by polling the store
        announce(job.connection, NewVersion(name=manifest.name, version=manifest.version, job_id=job.id))
    except RedisError as error:
        log.warning("job %s: stored %s, but Redis is away to announce it (%s)", job.id, manifest.ref, error)
    return {"adapter": manifest.ref}


def _claim_run(job: Job, make: Callable[[], Trainer]) -> Trainer:
    """The trainer, once this attempt holds the run. RQ took the attempt training there for abandoned
    and queued the job again: while that one lives, it registers again at its next heartbeat and keeps
    the job, and this one steps aside. Should it die before that, it would leave the job started and
    watched by no one, so this one waits out a heartbeat or two and trains if the run comes free."""
    deadline, told = time.monotonic() + LIVE_ATTEMPT_S, False
    while True:
        try:
            return make()
        except RunInUse as error:
            if time.monotonic() >= deadline:
                raise AnotherAttempt(_one_line(error)) from error
            if not told:
                log.warning("job %s: another attempt holds its run; waiting %s s to see it live", job.id, LIVE_ATTEMPT_S)
                told = True
            time.sleep(1)


def _one_line(error: Exception) -> str:
    """The message on one line: the worker and `gfn jobs status` read a failure's last line. A
    validation error names each field, without pydantic's links."""
    if isinstance(error, ValidationError):
        return "; ".join(config_errors(error))
    return " ".join(str(error).split())


class _Watch:
    """The job's Redis reads and writes between steps. RQ's client waits 15 s on a stalled Redis, and
    retries: at every step, that would all but stop training. This one waits QUICK_S, never retries,
    and after a failure leaves Redis alone for AWAY_S."""

    def __init__(self, job: Job):
        pool = job.connection.connection_pool
        settings = {**get_connection_kwargs(job.connection), "socket_timeout": QUICK_S,
                    "socket_connect_timeout": QUICK_S, "retry": Retry(NoBackoff(), 0)}
        self.redis = Redis(connection_pool=ConnectionPool(connection_class=pool.connection_class, **settings))
        self.job, self.away_until, self.seen_cancel, self.last_report = job, float("-inf"), False, float("-inf")

    def cancelled(self) -> bool:
        """Whether the job was cancelled; once seen, for good (Redis may be away when asked again)."""
        self.seen_cancel = self.seen_cancel or bool(self._call(lambda: cancel_requested(self.redis, self.job.id)))
        return self.seen_cancel

    def report(self, metrics: dict[str, Any]) -> None:
        """Saves progress to the job's meta, throttled. The last step's goes through RQ's own client,
        which waits out a slow Redis: the job's end, which RQ records next, waits on it all the same."""
        if metrics["step"] == metrics["total"]:
            try:
                save_progress(self.job.connection, self.job, metrics)
            except RedisError as error:
                log.warning("job %s: Redis is away to record its last step (%s)", self.job.id, error)
        elif time.monotonic() - self.last_report >= PROGRESS_EVERY_S:
            self.last_report = time.monotonic()
            self._call(lambda: save_progress(self.redis, self.job, metrics))

    def _call(self, call: Callable[[], Any]) -> Any:
        """The call's answer; None while Redis is away."""
        if time.monotonic() < self.away_until:
            return None
        try:
            return call()
        except RedisError:
            self.away_until = time.monotonic() + AWAY_S
            return None
