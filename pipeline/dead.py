"""The dead-letter list, operable: list, requeue, purge.

Each entry is JSON: ``{"queue", "reason", "failed_at", "job"}`` plus, when the job could be
decoded, ``id``, ``type`` and ``attempts``, and ``error`` (the last exception) or
``deliveries`` (times it died with its consumer). ``job`` is the envelope as it was fetched.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.errors import JobDecodeError
from pipeline.jobs import Job, decode
from pipeline.keys import Keys
from pipeline.registry import Registry, load_registry

# Move one entry back to its queue, only if it is still on the dead-letter list. The push
# comes before the removal, so a Redis out of memory refuses the script before it changes
# anything.
# KEYS: dead list, queue  ARGV: the entry's bytes, the job to push
_REQUEUE = """
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LREM', KEYS[1], 1, ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of the dead-letter list."""

    raw: bytes
    fields: dict[str, Any]
    job: Job | None

    @property
    def job_id(self) -> str | None:
        return self.job.id if self.job else self.fields.get("id")


def _parse(raw: bytes) -> DeadLetter:
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError:
        fields = {}
    if not isinstance(fields, dict):
        fields = {}
    job: Job | None = None
    text = fields.get("job")
    if isinstance(text, str):
        try:
            job = decode(text.encode("utf-8", "surrogateescape"))
        except (JobDecodeError, UnicodeEncodeError):
            job = None
    return DeadLetter(raw, fields, job)


class DeadLetters:
    """The dead-letter list of one prefix."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, registry: Registry | None = None) -> None:
        self._redis = redis
        self._keys = keys
        self._routes = (registry or load_registry()).routes
        self._requeue = redis.register_script(_REQUEUE)

    async def count(self) -> int:
        return int(await self._redis.llen(self._keys.dead))

    async def list(self, limit: int | None = None) -> list[DeadLetter]:
        """The newest ``limit`` entries (all when None), newest first."""
        end = -1 if limit is None else limit - 1
        entries = await self._redis.lrange(self._keys.dead, 0, end)
        return [_parse(raw if isinstance(raw, bytes) else raw.encode()) for raw in entries]

    async def requeue(self, job_id: str | None = None) -> tuple[int, int]:
        """Put dead jobs back on their queue as a first attempt: the one with ``job_id``, or all
        when None. Returns (requeued, skipped): an entry whose job cannot be decoded, or whose
        type no queue serves, is skipped and stays."""
        requeued = skipped = 0
        for entry in await self.list():
            if job_id is not None and entry.job_id != job_id:
                continue
            if entry.job is None or entry.job.type not in self._routes:
                skipped += 1
                continue
            fresh = dataclasses.replace(entry.job, attempt=0, enqueued_at=time.time())
            keys = [self._keys.dead, self._keys.queue(self._routes[entry.job.type])]
            requeued += int(await self._requeue(keys=keys, args=[entry.raw, fresh.encode()]))
        return requeued, skipped

    async def purge(self) -> int:
        """Delete every dead letter; how many there were."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.llen(self._keys.dead)
        pipe.delete(self._keys.dead)
        count, _ = await pipe.execute()
        return int(count)
