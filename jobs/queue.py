"""The training-job queue on Redis (RQ): what the service and `gfn jobs` call, and the
keys the worker reports through.

A job is one training config. The job function is named by its dotted path, so nothing
here imports the trainer; a worker (`gfn worker`) runs it. A job is retried a bounded
number of times (a crashed or killed worker's job too; not one refused at setup: JobRefused),
ahead of the jobs queued meanwhile, resuming from its checkpoint in `runs/<job id>`; the
store keeps at most one adapter version per job id. A worker asked to stop (SIGTERM) has its
job checkpoint and go back to the queue, its retries untouched (Interrupted). A job taken for
abandoned while its first attempt still trains (its worker lost Redis a while) is queued again,
but that attempt keeps the run: the new one steps aside, its retry given back (AnotherAttempt).

Cancelling is cooperative: a flag in Redis that the trainer reads at every step
boundary, after which it checkpoints and stops. The flag's value is a deadline after
which the worker stops the job by force (RQ's stop), in case a step never ends.
"""

from __future__ import annotations

import builtins
import re
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel
from redis import Redis
from redis.connection import ConnectionPool, parse_url
from rq import Queue, Retry
from rq.exceptions import AbandonedJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.results import Result
from rq.utils import now, utcformat

from jobs.validate import validate

QUEUE = "gfn-train"
JOB_FUNCTION = "trainer.worker.run_job"
KEEP_S = 7 * 24 * 3600  # finished and failed jobs stay visible this long
TIMEOUT_S = 24 * 3600  # per attempt; a timed-out attempt counts as failed
RETRIES = 2  # attempts after a failed or abandoned one (its worker died); each resumes
CANCEL_GRACE_S = 60.0  # from a cancel to the forced stop

State = Literal["queued", "started", "finished", "failed", "cancelled"]
_STATES: dict[RQStatus, State] = {
    RQStatus.STARTED: "started", RQStatus.FINISHED: "finished", RQStatus.FAILED: "failed",
    RQStatus.CANCELED: "cancelled", RQStatus.STOPPED: "cancelled",
}  # every other RQ status (queued, scheduled for a retry, deferred) is "queued"


class JobRefused(Exception):
    """The job's config, data or run directory is refused at setup: retrying cannot help, so
    the worker fails it at once (a crash or a killed worker is still retried)."""


class Interrupted(Exception):
    """The worker is stopping (SIGTERM: a redeploy, a scale-down): the job checkpointed at a step
    boundary and goes back to the queue without spending a retry; the next worker resumes it."""


class AnotherAttempt(Exception):
    """Another attempt of the job holds its run directory and trains on: RQ took it for abandoned
    (its worker missed heartbeats while Redis was away) and queued the job again. This attempt steps
    aside without spending a retry; the job stays with the live one."""


class JobNotFound(LookupError):
    pass


class Progress(BaseModel):
    """The trainer's last report: `elapsed` and `eta` in seconds, training time only."""

    step: int
    total: int
    loss: float
    log_reward: float
    temperature: float
    elapsed: float
    eta: float


class JobStatus(BaseModel):
    id: str
    name: str  # the adapter the job trains
    status: State
    progress: Progress | None = None
    adapter: str | None = None  # "name@vN", once finished
    error: str | None = None  # the last attempt's exception (its last line), when it failed
    cancel_requested: bool = False
    retries_left: int = 0
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


def check_redis_url(url: str) -> str:
    """`url` if redis can parse it, its database is a number and its query names only connection
    arguments; else ValueError saying why, the password masked (redis itself raises a bare
    ValueError, or a TypeError for an unknown argument, at the first connection, and reads `/jobs`
    as database 0)."""
    try:
        parse_url(url)
    except ValueError as error:
        raise ValueError(f"{shown_url(url)!r}: {error}") from None
    database = urlsplit(url).path.strip("/")
    if url.startswith(("redis:", "rediss:")) and database and not database.isdigit():
        raise ValueError(f"{shown_url(url)!r}: the database {database!r} is not a number (redis://host:port/0)")
    try:
        ConnectionPool.from_url(url).make_connection()  # builds a connection's arguments; connects to nothing
    except (TypeError, ValueError) as error:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        said = f"redis takes no query argument {unknown[1]!r}" if unknown else str(error)
        raise ValueError(f"{shown_url(url)!r}: {said}") from None
    return url


def shown_url(redis_url: str) -> str:
    """The URL as it may be printed: without its password (in the address or the query)."""
    parts = urlsplit(redis_url)
    netloc = parts.netloc if parts.password is None else parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    query = re.sub(r"(?i)\bpassword=[^&]*", "password=***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class JobQueue:
    def __init__(self, redis: Redis):
        self.redis = redis
        self.queue = Queue(QUEUE, connection=redis)

    def submit(self, config: Mapping[str, Any], timeout_s: int = TIMEOUT_S, retries: int = RETRIES) -> str:
        """Queue a training config (checked against the schema first: ConfigError) and
        return the job id."""
        data = validate(config)
        job = self.queue.enqueue(
            JOB_FUNCTION, data, job_timeout=timeout_s,
            retry=Retry(max=retries, enqueue_at_front=True) if retries else None,
            result_ttl=KEEP_S, failure_ttl=KEEP_S, description=data["name"], meta={"name": data["name"]},
        )
        return job.id

    def status(self, job_id: str) -> JobStatus:
        return self._status(self._fetch(job_id))

    def config(self, job_id: str) -> dict[str, Any]:
        """The training config the job was queued with."""
        return self._fetch(job_id).args[0]

    def list(self, limit: int = 20) -> builtins.list[JobStatus]:
        """The `limit` most recently queued jobs that are still kept, newest first (a job queued
        again, retried or handed back, counts from then)."""
        q = self.queue
        ids = set(q.get_job_ids(max(0, q.count - limit), limit))  # the newest queued: the list's tail
        ids.update(q.get_job_ids(0, limit))  # and its head: jobs queued again go first in line
        for registry in (q.started_job_registry, q.finished_job_registry, q.failed_job_registry,
                         q.canceled_job_registry, q.scheduled_job_registry, q.deferred_job_registry):
            ids.update(registry.get_job_ids(0, limit - 1, desc=True, cleanup=False))  # a read: workers clean up
        jobs = [job for job in Job.fetch_many(sorted(ids), connection=self.redis) if job is not None]
        jobs.sort(key=lambda job: job.enqueued_at or job.created_at, reverse=True)
        return [self._status(job) for job in jobs[:limit]]

    def cancel(self, job_id: str, grace_s: float = CANCEL_GRACE_S) -> JobStatus:
        """Ask the job to stop at its next step boundary (a queued job never starts); after
        `grace_s` the worker stops it by force. Cancelling an ended job changes nothing, but one
        failed as abandoned may still train (its worker only lost Redis a while): it gets the flag."""
        job = self._fetch(job_id)
        state = job.get_status()
        if _STATES.get(state) in ("finished", "failed", "cancelled") and not _abandoned(job):
            return self._status(job)
        self.redis.set(cancel_key(job_id), time.time() + grace_s, nx=True, ex=KEEP_S)
        if state in (RQStatus.QUEUED, RQStatus.SCHEDULED, RQStatus.DEFERRED):
            try:
                job.cancel()
                self.redis.hset(job.key, "ended_at", utcformat(now()))  # RQ leaves a cancelled job unended
                job.cleanup(KEEP_S)  # kept as long as an ended job, not forever
            except InvalidJobOperation:  # a cancel at the same moment got there first
                pass
        return self.status(job_id)

    def _fetch(self, job_id: str) -> Job:
        try:
            return Job.fetch(job_id, connection=self.redis)
        except (NoSuchJobError, ValueError):
            raise JobNotFound(f"no job {job_id!r} (finished and failed jobs are kept {KEEP_S // 86400} days)") from None

    def _status(self, job: Job) -> JobStatus:
        state = _STATES.get(job.get_status(refresh=False), "queued")
        latest = job.latest_result()
        ok = latest is not None and latest.type == Result.Type.SUCCESSFUL
        result = (latest.return_value if ok else None) or {}
        if state == "finished" and result.get("cancelled"):
            state = "cancelled"
        failed = latest is not None and latest.type == Result.Type.FAILED and state != "cancelled"
        progress = job.meta.get("progress")
        return JobStatus(
            id=job.id, name=job.meta.get("name", job.description), status=state,
            progress=Progress.model_validate(progress) if progress else None, adapter=result.get("adapter"),
            error=_last_line(latest.exc_string) if failed else None,
            cancel_requested=cancel_requested(self.redis, job.id), retries_left=job.retries_left or 0,
            enqueued_at=_utc(job.enqueued_at), started_at=_utc(job.started_at), ended_at=_utc(job.ended_at),
        )


# ---------------------------------------------------------------- the worker's side
def cancel_key(job_id: str) -> str:
    return f"gfn:jobs:{job_id}:cancel"


def cancel_requested(redis: Redis, job_id: str) -> bool:
    return bool(redis.exists(cancel_key(job_id)))


def cancel_deadline(redis: Redis, job_id: str) -> float | None:
    """When a cancelled job is to be stopped by force; None when not cancelled."""
    value = redis.get(cancel_key(job_id))
    return float(value) if value is not None else None


def save_progress(redis: Redis, job: Job, metrics: Mapping[str, Any]) -> None:
    """Through `redis`, which need not be the job's client (the job's waits long on a stalled Redis)."""
    job.meta["progress"] = Progress.model_validate(metrics).model_dump()
    redis.hset(job.key, "meta", job.serializer.dumps(job.meta))


def _abandoned(job: Job) -> bool:
    """RQ failed the job for its worker's missed heartbeats: its last attempt may train on."""
    latest = job.latest_result()
    return (job.get_status(refresh=False) == RQStatus.FAILED and latest is not None
            and AbandonedJobError.__name__ in (latest.exc_string or ""))


def _last_line(text: str | None) -> str | None:
    """An exception's message: the last line of its traceback, without the module path of one of
    the project's own exceptions ("jobs.queue.JobRefused: "), whose message names the error."""
    lines = (text or "").strip().splitlines()
    return re.sub(r"^(?:adapters|jobs|trainer)\.[\w.]+: ", "", lines[-1]) if lines else None


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=timezone.utc) if moment is not None and moment.tzinfo is None else moment
