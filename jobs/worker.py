"""`gfn worker`: RQ's spawn worker, tuned for long training jobs. Run one per device.

- Each job runs in a freshly spawned process, so whatever memory it took (GPU memory
  included) is returned when it ends; this process never imports torch.
- A worker killed mid-job, even by SIGKILL, takes its job's process with it and stops
  sending heartbeats: within MONITOR_S + HEARTBEAT_GRACE_S RQ counts the job as abandoned
  and, while it has retries left, queues it again for any worker; it resumes from its
  checkpoint.
- A worker asked to stop (SIGTERM, as `docker stop` and `gfn up` send) passes it to its job's
  process: the job checkpoints at its next step boundary and goes back to the queue without
  spending a retry (a second SIGTERM, or SIGKILL, stops it at once: then it is abandoned). A job
  process the SIGTERM ends before it can catch it (in its first moments) goes back the same way.
- A cancelled job still running at its deadline is stopped by force (RQ's stop).
- Redis going away does not stop it: a running job trains on (its progress is not saved
  meanwhile), and where RQ's worker loop gives up on a lost connection, a new worker
  starts once Redis answers again. Away longer than the heartbeat grace, the job is taken for
  abandoned and queued again; the attempt that trains on keeps it (its heartbeats register it
  again), and the new attempt, finding the run directory in use for two heartbeats, steps aside
  (AnotherAttempt).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.command import handle_stop_job_command
from rq.executions import Execution
from rq.job import Job
from rq.worker import SpawnWorker

from jobs.metrics import WorkerMetrics, serve_metrics
from jobs.queue import QUEUE, AnotherAttempt, Interrupted, JobQueue, JobRefused, cancel_deadline

MONITOR_S = 5  # the worker looks at its job's process (and heartbeats) this often
HEARTBEAT_GRACE_S = 20  # a job whose worker missed its heartbeats this long is abandoned
MAINTENANCE_S = 10  # an idle worker looks for abandoned jobs this often
WORKER_TTL_S = 20  # an idle worker wakes every WORKER_TTL_S - 15 s (RQ's rule)
RESTART_S = 5  # pause before a worker lost to a Redis error is replaced
PR_SET_PDEATHSIG = 1
_TERMINATED = f"(signal {signal.SIGTERM.value});"  # how RQ's failure ends for a job process SIGTERM ended
log = logging.getLogger("rq.worker")  # beside RQ's own lines in the worker's log
_stopping = threading.Event()  # in the job's process: its worker passed on a SIGTERM


class TrainingWorker(SpawnWorker):
    metrics: WorkerMetrics  # set by run()
    stopping = False  # a stop was requested (SIGTERM, SIGINT or RQ's shutdown command)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """RQ allows 60 s past a missed heartbeat; this process only waits on its job,
        so a short grace requeues a dead worker's job sooner."""
        return self.job_monitoring_interval + HEARTBEAT_GRACE_S

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        try:
            super().maintain_heartbeats(job, execution)
            # RQ's heartbeat only refreshes the job's entry among the started: one dropped as abandoned
            # while Redis was away is written again, so that the attempt training on is watched again
            job.started_job_registry.add_execution(execution, self.connection, ttl=self.get_heartbeat_ttl(job))
            deadline = cancel_deadline(self.connection, job.id)
        except RedisError as error:  # RQ would quit, and the job's process die with it
            self.log.warning("job %s: no heartbeat, Redis is away (%s); training on", job.id, error)
            return
        if deadline is not None and time.time() > deadline:
            self.log.warning("job %s: cancelled and still running past its deadline; stopping it", job.id)
            handle_stop_job_command(self, {"job_id": job.id})

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry=None, exc_string: str = "",
                           execution: Execution | None = None) -> None:
        """A job refused at setup fails at once: each retry would be refused the same way. An
        interrupted one (also one whose process our SIGTERM ended before it could catch it) is queued
        again, first in line, with the retry RQ takes for it given back. One whose run another attempt
        holds is left to that attempt."""
        raised = exc_string.rstrip().rpartition("\n")[2]
        if raised.startswith(_name(AnotherAttempt)):
            self._step_aside(job, execution)
            return
        if raised.startswith(_name(JobRefused)):
            job.retries_left = 0
        elif raised.startswith(_name(Interrupted)) or (self.stopping and raised.endswith(_TERMINATED)):
            job.retries_left = (job.retries_left or 0) + 1
            job.enqueue_at_front_on_retry = True  # as every retry (JobQueue.submit), also without retries
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def _step_aside(self, job: Job, execution: Execution | None) -> None:
        """The job's live attempt keeps it: this one's execution goes, and the retry that queued it
        again comes back. Its status is left as it is: started, or as the live attempt ended it since."""
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline, execution)
            pipeline.hincrby(job.key, "retries_left", 1)
            pipeline.execute()

    def handle_exception(self, job: Job, *exc_info) -> None:
        """A job handed back (Interrupted) or left to its live attempt is no error: one line, no traceback."""
        if isinstance(exc_info[1], AnotherAttempt):
            self.log.warning("job %s: another attempt trains on; leaving it to that one: %s", job.id, exc_info[1])
            return
        if isinstance(exc_info[1], Interrupted):
            self.log.warning("job %s: back to the queue: %s", job.id, exc_info[1])
            return
        super().handle_exception(job, *exc_info)

    def handle_warm_shutdown_request(self) -> None:
        self.stopping = True
        super().handle_warm_shutdown_request()
        if self.horse_pid:  # the running job checkpoints at its next step and goes back to the queue
            self.kill_horse(signal.SIGTERM)

    def setup_work_horse_signals(self) -> None:
        """In the job's process: SIGTERM (the worker's, passed on) asks it to stop at a step boundary."""
        super().setup_work_horse_signals()
        signal.signal(signal.SIGTERM, lambda *_: _stopping.set())

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.metrics.running_job = job.id
        try:
            super().execute_job(job, queue)
        finally:
            self.metrics.running_job = None
        self.metrics.job_ended(job.id)

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        """The job's process rebuilds this worker from its record in Redis: a record lost meanwhile
        (Redis flushed, restarted without persistence, the key evicted) is written again first,
        or the process could not start, and every job would fail in its place."""
        if self.connection.hget(self.key, "pid") is None:
            self.log.warning("Worker %s: its record in Redis was lost; registering again", self.name)
            self.connection.delete(self.key)
            self.register_birth()
        super().fork_work_horse(job, queue)
        if self.stopping:  # asked to stop before the job's process was there to be told
            self.kill_horse(signal.SIGTERM)

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        """Runs in the job's process."""
        _die_with(self.pid)
        super().main_work_horse(job, queue)


def stopping() -> bool:
    """In the job's process: its worker is stopping, so the job should checkpoint and step aside."""
    return _stopping.is_set()


def _name(error: type[Exception]) -> str:
    """How an exception's class leads the last line of its traceback."""
    return f"{error.__module__}.{error.__name__}"


def run(redis_url: str, metrics_port: int = 0) -> None:
    """Work on the training queue until stopped (SIGTERM: once the running job has checkpointed
    and gone back to the queue; a second SIGTERM: at once). With `metrics_port`, serve /metrics on it."""
    redis = Redis.from_url(redis_url)
    metrics = WorkerMetrics(JobQueue(redis))
    if metrics_port:
        serve_metrics(metrics.registry, metrics_port)
    while True:
        worker = None
        try:  # RQ's worker reads Redis as it is made, starts and ends: Redis may be away at each
            worker = TrainingWorker([QUEUE], connection=redis, job_monitoring_interval=MONITOR_S,
                                    worker_ttl=WORKER_TTL_S, maintenance_interval=MAINTENANCE_S)
            worker.metrics = metrics
            worker.work(logging_level="INFO")
        except RedisError as error:
            log.warning("Redis is away (%s)", error)
        if worker is not None and worker.stopping:
            return
        log.warning("the worker stopped on an error; a new one starts in %s s", RESTART_S)
        time.sleep(RESTART_S)


def _die_with(parent_pid: int) -> None:
    """Have the kernel kill this process when the worker dies (Linux), so that a killed
    worker's job never trains on unwatched while RQ hands it to another worker."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None)
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the worker died before prctl
        os._exit(1)
