"""Queue operations both sides use: push, fetch, return, dead-letter, and reading the state.

Lists are LPUSH in and BRPOP out, so each queue is FIFO. A job returned to its queue goes back
with RPUSH, to the end BRPOP pops from: it is the next one fetched.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from pipeline.errors import UnknownJobTypeError
from pipeline.jobs import Job, new_job
from pipeline.keys import COUNTERS, JOB_QUEUES, QUEUES, Keys


class JobSink(Protocol):
    """Where a receiver pushes jobs: a signup's unit of work, or a queue directly."""

    async def push(self, job_type: str, payload: dict[str, Any]) -> Job:
        """Queue one job of ``job_type``; return it."""
        ...


def queue_for(job_type: str) -> str:
    """The queue a job type travels on."""
    try:
        return JOB_QUEUES[job_type]
    except KeyError:
        raise UnknownJobTypeError(f"no queue serves job type {job_type!r}") from None


class DirectQueue:
    """A :class:`JobSink` that LPUSHes each job at once: for scripts and tests, outside a
    request. Inside a request the signup's unit of work collects the jobs instead."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def push(self, job_type: str, payload: dict[str, Any]) -> Job:
        job = new_job(job_type, payload)
        await self._redis.lpush(self._keys.queue(queue_for(job_type)), job.encode())
        return job


async def fetch(redis: aioredis.Redis, keys: Keys, queue: str, timeout: float) -> bytes | None:
    """Block up to ``timeout`` seconds for the oldest job of ``queue``."""
    reply = await redis.brpop([keys.queue(queue)], timeout=timeout)
    if reply is None:
        return None
    raw = reply[1]
    return raw if isinstance(raw, bytes) else raw.encode()


async def return_job(redis: aioredis.Redis, keys: Keys, queue: str, raw: bytes) -> None:
    """Put a fetched job back where it will be fetched next."""
    await redis.rpush(keys.queue(queue), raw)


async def dead_letter(
    redis: aioredis.Redis, keys: Keys, queue: str, raw: bytes, reason: str
) -> None:
    """Keep a job that cannot be processed, with the reason, on the dead-letter list."""
    entry = {
        "queue": queue,
        "reason": reason,
        "failed_at": time.time(),
        "job": raw.decode("utf-8", "backslashreplace"),
    }
    await redis.lpush(keys.dead, orjson.dumps(entry))


async def read_stats(redis: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    """Counters, queue depths and the dead-letter count, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    pipe.hmget(keys.stats, list(COUNTERS))
    for name in QUEUES:
        pipe.llen(keys.queue(name))
    pipe.llen(keys.dead)
    counters, *depths, dead = await pipe.execute()
    stats: dict[str, Any] = {
        name: int(value or 0) for name, value in zip(COUNTERS, counters, strict=True)
    }
    stats["queues"] = dict(zip(QUEUES, map(int, depths), strict=True))
    stats["dead_letter"] = int(dead)
    return stats
