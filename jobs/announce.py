"""New adapter versions, announced on Redis when a training job stores one.

A running service subscribes to `CHANNEL` to load a new version at once; messages are
`NewVersion` as JSON. Pub/sub drops messages while a subscriber is disconnected, so
`LATEST` (a sorted set: adapter name -> highest announced version) lets it catch up on
(re)connecting; the store itself stays the truth, to poll when Redis is away.
"""

from __future__ import annotations

from pydantic import BaseModel
from redis import Redis

CHANNEL = "gfn:adapters:new"
LATEST = "gfn:adapters:latest"


class NewVersion(BaseModel):
    name: str
    version: int
    job_id: str | None = None


def announce(redis: Redis, new: NewVersion) -> None:
    """Record and publish `new`; announcing a version twice (a retried job) is harmless."""
    with redis.pipeline() as pipe:
        pipe.zadd(LATEST, {new.name: new.version}, gt=True)
        pipe.publish(CHANNEL, new.model_dump_json())
        pipe.execute()
