"""The training job a `gfn worker` runs: one queued config, trained to an adapter version.

Its run directory is `runs/<job id>`, so a job retried after its worker died resumes from
its checkpoint, and the store maps the job id to at most one version. Progress goes to
the job's meta (read by `JobQueue.status`), at most every PROGRESS_EVERY_S; the cancel
flag, and whether its worker is stopping, are read at every step boundary. While Redis is
away the job trains on, unobserved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError
from rq import get_current_job
from rq.job import Job

from adapters.home import runs_root, store_root
from adapters.store import AdapterStore
from jobs.announce import NewVersion, announce
from jobs.queue import Interrupted, JobRefused, cancel_requested, save_progress
from jobs.worker import stopping
from trainer.config import TrainConfig, config_errors
from trainer.loop import Trainer

PROGRESS_EVERY_S = 1.0
log = logging.getLogger("rq.worker")  # the job's lines beside its worker's


def run_job(config: dict[str, Any]) -> dict[str, Any]:
    """Train `config`; returns {"adapter": "name@vN"}, or {"cancelled": True, "step": n}
    when cancelled (after a checkpoint)."""
    job = get_current_job()
    if _cancelled(job):  # cancelled while its last worker died: RQ retried it; stop before loading anything
        return {"cancelled": True, "step": (job.meta.get("progress") or {}).get("step", 0)}
    try:  # the cross-field rules the schema cannot check, a missing base model, data, a damaged run
        trainer = Trainer(
            TrainConfig.model_validate(config), runs_root() / job.id, AdapterStore(store_root()), job_id=job.id,
            on_progress=_reporter(job), should_stop=lambda: _cancelled(job) or stopping(), quiet=True,
        )
    except (ValueError, FileNotFoundError) as error:  # the config, its data, the base model: a retry fails alike
        raise JobRefused(f"{type(error).__name__}: {_one_line(error)}") from error
    manifest = trainer.run()
    if manifest is None and not _cancelled(job):  # its worker is stopping: the next one resumes it
        raise Interrupted(f"the worker stopped; the job resumes from its checkpoint at step {trainer.step}")
    if manifest is None:
        return {"cancelled": True, "step": trainer.step}
    try:  # stored is done: a service that misses the announcement finds the version by polling the store
        announce(job.connection, NewVersion(name=manifest.name, version=manifest.version, job_id=job.id))
    except RedisError as error:
        log.warning("job %s: stored %s, but Redis is away to announce it (%s)", job.id, manifest.ref, error)
    return {"adapter": manifest.ref}


def _one_line(error: Exception) -> str:
    """The message on one line: the worker and `gfn jobs status` read a failure's last line. A
    validation error names each field, without pydantic's links."""
    if isinstance(error, ValidationError):
        return "; ".join(config_errors(error))
    return " ".join(str(error).split())


def _cancelled(job: Job) -> bool:
    try:
        return cancel_requested(job.connection, job.id)
    except RedisError:
        return False


def _reporter(job: Job) -> Callable[[dict[str, Any]], None]:
    """Saves progress to the job's meta, throttled; the last step is always saved."""
    last = float("-inf")

    def report(metrics: dict[str, Any]) -> None:
        nonlocal last
        if time.monotonic() - last >= PROGRESS_EVERY_S or metrics["step"] == metrics["total"]:
            last = time.monotonic()
            try:
                save_progress(job, metrics)
            except RedisError:
                pass

    return report
