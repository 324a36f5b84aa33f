"""``make bench``'s dashboard part: what the operator's dashboard costs Redis, per refresh of
the overview (its first, which reads the whole 15-minute history, and the next ones, which
read only the buckets still open), per ``/stats`` (the same snapshot, no history) and per page
of dead letters. Redis is filled as a busy pipeline leaves it: 1,000 latency samples per
queue, 100 jobs waiting in each, every history bucket, two live consumers and 10,000 dead
letters. Figures are Redis's own CPU (``INFO cpu``) over many calls, per call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.dead import DeadLetter, DeadLetters
from pipeline.jobs import new_job
from pipeline.keys import Keys
from pipeline.plan import resolve
from pipeline.queue import HISTORY_BUCKET, HISTORY_SECONDS
from pipeline.settings import Settings
from pipeline.stats import HistoryCache, read_stats

CALLS = 300
DEAD_LETTERS = 10_000


def bench_dashboard(redis_url: str) -> dict[str, float]:
    """Redis CPU µs per call of each of the dashboard's reads (see the module's text)."""
    return asyncio.run(_measure(redis_url))


async def _measure(redis_url: str) -> dict[str, float]:
    plan = resolve(Settings.from_env({"REDIS_URL": redis_url}))
    registry = plan.registry
    redis = aioredis.Redis.from_url(redis_url)
    keys = Keys(plan.settings.key_prefix)
    try:
        await redis.flushall()
        await _fill(redis, keys, registry.queues)
        dead = DeadLetters(redis, keys, registry)
        cache = HistoryCache()
        reads: dict[str, Callable[[], Awaitable[Any]]] = {
            "overview, first refresh": lambda: read_stats(redis, keys, registry, history=True),
            "overview, next refreshes": lambda: read_stats(redis, keys, registry, history=cache),
            "/stats (no history)": lambda: read_stats(redis, keys, registry),
            "a page of 25 dead letters": lambda: dead.page(0, 25),
        }
        found = {}
        for name, read in reads.items():
            await read()  # the script loaded, the cache filled
            found[name] = await _cpu_per_call(redis, read)
        return found
    finally:
        await redis.flushall()
        await redis.aclose()


async def _fill(redis: aioredis.Redis, keys: Keys, queues: tuple[str, ...]) -> None:
    for queue in queues:
        await redis.lpush(keys.latency(queue), *[f"{i % 50}.5 {i % 30}.25" for i in range(1000)])
        jobs = [new_job("welcome_email", {"n": i}).encode() for i in range(100)]
        await redis.lpush(keys.queue(queue), *jobs)
    now = int(time.time())
    for b in range(HISTORY_SECONDS // HISTORY_BUCKET + 1):
        start = now - now % HISTORY_BUCKET - b * HISTORY_BUCKET
        bucket = {"done": 100, "failed": 2, "users": 10_000 - b}
        await redis.hset(f"{keys.history_prefix}{start}", mapping=bucket)  # type: ignore[arg-type]
    for consumer in ("bench-1", "bench-2"):
        about = {"host": "bench", "pid": 1, "queues": dict.fromkeys(queues, 8), "mode": "-"}
        await redis.set(keys.lease(consumer), orjson.dumps(about), px=600_000)
        await redis.zadd(keys.consumers, {consumer: time.time()})
    for start in range(0, DEAD_LETTERS, 1000):
        entries = [
            DeadLetter.for_job(
                "email", new_job("welcome_email", {"n": i}).encode(), "failed", error="boom"
            ).encode()
            for i in range(start, start + 1000)
        ]
        await redis.lpush(keys.dead, *entries)


async def _cpu_per_call(redis: aioredis.Redis, read: Callable[[], Awaitable[Any]]) -> float:
    before = await redis.info("cpu")
    for _ in range(CALLS):
        await read()
    after = await redis.info("cpu")
    spent = sum(float(after[k]) - float(before[k]) for k in ("used_cpu_sys", "used_cpu_user"))
    return spent / CALLS * 1e6
