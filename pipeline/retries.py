"""The retries waiting in each queue's delayed set: listing them by when they are due, running
one now, deleting one. The dashboard's Retries page uses these.

A retry is named by its bytes as stored (the set's member): an action on it happens only if
exactly that retry is still waiting, so one the promoter has moved meanwhile is "gone", never
run twice.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from pipeline.errors import JobDecodeError
from pipeline.jobs import Job, decode
from pipeline.keys import Keys

# Move one retry to the head of its queue's line now (where the promoter puts due ones), only
# if it is still waiting. The push comes before the removal (see pipeline.queue._SETTLE).
# KEYS: delayed set, queue  ARGV: the retry's bytes, the job to push
_RUN_NOW = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class DelayedRetry:
    """One retry waiting: its bytes as stored, when it is due (Unix seconds), and its job
    (None if it cannot be decoded)."""

    raw: bytes
    due_at: float
    job: Job | None

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "backslashreplace")


class DelayedRetries:
    """The delayed sets of one prefix."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._run_now = redis.register_script(_RUN_NOW)

    async def page(self, queue: str, offset: int, limit: int) -> tuple[int, list[DelayedRetry]]:
        """How many retries ``queue`` has waiting, and ``limit`` of them from ``offset``,
        soonest due first: one round trip."""
        key = self._keys.delayed(queue)
        pipe = self._redis.pipeline(transaction=True)
        pipe.zcard(key)
        pipe.zrange(key, offset, offset + limit - 1, withscores=True)
        total, members = await pipe.execute()
        return int(total), [
            DelayedRetry(_bytes(raw), due, _job(_bytes(raw))) for raw, due in members
        ]

    async def run_now(self, queue: str, raw: bytes) -> bool:
        """Put the retry ``raw`` at the head of ``queue``'s line now; False if it is no longer
        waiting. Its job is stamped as queued now, so its queue wait counts from here."""
        job = _job(raw)
        fresh = dataclasses.replace(job, enqueued_at=time.time()).encode() if job else raw
        keys = [self._keys.delayed(queue), self._keys.queue(queue)]
        return bool(int(await self._run_now(keys=keys, args=[raw, fresh])))

    async def delete(self, queue: str, raw: bytes) -> bool:
        """Drop the retry ``raw``; False if it is no longer waiting."""
        return bool(await self._redis.zrem(self._keys.delayed(queue), raw))


def _job(raw: bytes) -> Job | None:
    try:
        return decode(raw)
    except JobDecodeError:
        return None


def _bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()
