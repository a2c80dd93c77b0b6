"""New adapter versions, announced on Redis when a training job stores one.

A running service subscribes to `CHANNEL` to load a new version at once; messages are
`NewVersion` as JSON. Pub/sub drops messages while a subscriber is disconnected, so
`LATEST` (a sorted set: adapter name -> highest announced version) lets it catch up on
(re)connecting; the store itself stays the truth, to poll when Redis is away.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field
from redis import Redis

from adapters.store import MAX_VERSION, check_name

CHANNEL = "gfn:adapters:new"
LATEST = "gfn:adapters:latest"


class NewVersion(BaseModel):
    """A stored version as a ref spells it: a garbled or forged announcement is refused on reading."""

    name: Annotated[str, AfterValidator(check_name)]
    version: int = Field(ge=1, le=MAX_VERSION)
    job_id: str | None = None


def announce(redis: Redis, new: NewVersion) -> None:
    """Record and publish `new`; announcing a version twice (a retried job) is harmless."""
    with redis.pipeline() as pipe:
        pipe.zadd(LATEST, {new.name: new.version}, gt=True)
        pipe.publish(CHANNEL, new.model_dump_json())
        pipe.execute()
