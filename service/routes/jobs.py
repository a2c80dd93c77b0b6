"""Training jobs: queue one, follow it, cancel it. The queue lives in Redis (jobs/); a
`gfn worker` trains, and the service loads the version a job writes (service/watcher.py).

Routes are plain `def`s: the Redis client is synchronous, so FastAPI runs them in its
thread pool and the event loop never waits on Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path as PathLib
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from jobs import ConfigError, JobNotFound, JobQueue, JobStatus, bundled_configs, load
from jobs.configs import relative_data_paths
from service.deps import State
from service.errors import invalid, responses
from service.routes.strict import StrictRoute
from service.state import ServiceState

router = APIRouter(tags=["jobs"], route_class=StrictRoute,
                   responses={503: {"description": "Redis unreachable or not configured"}})
T = TypeVar("T")
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class JobSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="the task to train: rng, infill, constrained, reasoning, continuation")
    config: str | None = Field(None, description="bundled base config (default: the one named after the task)")
    overrides: dict[str, Any] = Field(default_factory=dict, description='e.g. {"steps": 300, "optim.lr": 1e-3}')


def _queue(state: ServiceState) -> JobQueue:
    if state.jobs is None:
        raise HTTPException(503, "training jobs need Redis: start the service with GFN_REDIS_URL set")
    return state.jobs


def _call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Redis going away is the service's degradation, not a client error: 503, clearly."""
    try:
        return function(*args, **kwargs)
    except RedisError as error:
        raise HTTPException(503, f"Redis is unreachable, training jobs are unavailable until it returns: {error}")
    except JobNotFound as error:
        raise HTTPException(404, str(error) or "no such job")


@router.post("/jobs", status_code=202, responses={422: {"description": "the config names the bad field"},
                                                   **responses(413, 415)})
def submit_job(body: JobSubmit, state: State) -> JobStatus:
    """Validate the config (base config + overrides) and queue it; returns the job with its id."""
    queue = _queue(state)
    job_id = _call(queue.submit, _job_config(body, state))
    return _call(queue.status, job_id)


def _job_config(body: JobSubmit, state: ServiceState) -> dict[str, Any]:
    """The config a submission asks for, checked (a 422 naming the field), on the served base model."""
    name = body.config or body.task
    if name not in bundled_configs():
        raise invalid("config" if body.config else "task", f"no bundled config {name!r}; "
                      f"bundled: {', '.join(bundled_configs())}", name)
    try:
        data = load(name, body.overrides)
    except ConfigError as error:
        raise invalid("overrides", "; ".join(error.errors), body.overrides)
    if relative := relative_data_paths(data):
        raise invalid("overrides", f"{', '.join(relative)}: give an absolute path on the workers' machine (a "
                      "relative one would be read from the worker's directory)", body.overrides)
    if data.get("task", {}).get("name") != body.task:
        raise invalid("task", f"config {name!r} trains task {data.get('task', {}).get('name')!r}, not {body.task!r}",
                      body.task)
    try:
        state.registry.store.check_task(data["name"], body.task)
    except ValueError as error:
        raise invalid("overrides", str(error), body.overrides)
    if "base_model" in body.overrides and not _same_path(data["base_model"], state.base_model):
        raise invalid("overrides", f"this service serves base model {state.base_model}; a job for it trains on "
                      f"that one, not {data['base_model']}", body.overrides)
    data["base_model"] = state.base_model  # what the service serves, not the bundled configs' demo
    return data


def _same_path(a: str, b: str) -> bool:
    """The same directory however spelled (a trailing slash, `..`, a link); a path that cannot
    be resolved (a NUL in it) is another."""
    try:
        return PathLib(a).resolve() == PathLib(b).resolve()
    except (OSError, ValueError, RuntimeError):
        return False


@router.get("/jobs")
def list_jobs(state: State, limit: Annotated[int, Query(ge=1, le=200)] = 20) -> list[JobStatus]:
    """Recent jobs, newest first."""
    return _call(_queue(state).list, limit)


@router.get("/jobs/{job_id}", responses={404: {"description": "no such job"}})
def job_status(job_id: JobId, state: State) -> JobStatus:
    """Status, progress (step, total, loss, log-reward, temperature, elapsed, ETA), and the
    adapter version written once finished, or the error once failed."""
    return _call(_queue(state).status, job_id)


@router.delete("/jobs/{job_id}", responses={404: {"description": "no such job"}})
def cancel_job(job_id: JobId, state: State) -> JobStatus:
    """Cancel: the trainer stops at its next step boundary after a checkpoint (forced after a grace period)."""
    return _call(_queue(state).cancel, job_id)
