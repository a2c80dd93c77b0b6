"""The training-job queue on Redis: the contract between the service (which queues jobs and
learns of new adapter versions) and `gfn worker` (which trains them).

Nothing here imports the trainer, the demo world or torch: configs are checked against
`configs/schema.json`, and the job function is named by its path. `jobs.worker` and
`jobs.metrics` (the worker process) are not re-exported.
"""

from jobs.announce import CHANNEL, LATEST, NewVersion, announce
from jobs.configs import ConfigError, bundled_configs, config_data
from jobs.queue import JobNotFound, JobQueue, JobStatus, Progress
from jobs.validate import load, validate

__all__ = [
    "CHANNEL",
    "LATEST",
    "ConfigError",
    "JobNotFound",
    "JobQueue",
    "JobStatus",
    "NewVersion",
    "Progress",
    "announce",
    "bundled_configs",
    "config_data",
    "load",
    "validate",
]
