"""Reading the pipeline's state: counters, queue depths, jobs held, retries waiting, dead
letters, live consumers and recent latency percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.keys import COUNTERS, QUEUES, Keys


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def _latency(samples: Sequence[bytes]) -> dict[str, Any]:
    waits: list[float] = []
    runs: list[float] = []
    for sample in samples:
        wait, _, run = sample.partition(b" ")
        try:
            waits.append(float(wait))
            runs.append(float(run))
        except ValueError:
            continue
    waits.sort()
    runs.sort()
    return {
        "samples": len(waits),
        "wait_ms": {"p50": percentile(waits, 0.5), "p99": percentile(waits, 0.99)},
        "run_ms": {"p50": percentile(runs, 0.5), "p99": percentile(runs, 0.99)},
    }


def text(value: object) -> str:
    """A Redis reply as text (the clients here do not decode replies)."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_stats(redis: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    """Everything in two round trips. ``consumers`` lists the live ones: their lease and what
    they said about themselves."""
    pipe = redis.pipeline(transaction=False)
    pipe.hmget(keys.stats, list(COUNTERS))
    for name in QUEUES:
        pipe.llen(keys.queue(name))
    for name in QUEUES:
        pipe.zcard(keys.delayed[name])
    pipe.llen(keys.dead)
    pipe.zrange(keys.consumers, 0, -1)
    for name in QUEUES:
        pipe.lrange(keys.latency(name), 0, -1)
    replies = await pipe.execute()
    counters = replies[0]
    depths = replies[1 : 1 + len(QUEUES)]
    delayed = replies[1 + len(QUEUES) : 1 + 2 * len(QUEUES)]
    dead, registered = replies[1 + 2 * len(QUEUES) : 3 + 2 * len(QUEUES)]
    latencies = replies[3 + 2 * len(QUEUES) :]
    ids = [text(i) for i in registered]

    processing = dict.fromkeys(QUEUES, 0)
    consumers: list[dict[str, Any]] = []
    if ids:
        pipe = redis.pipeline(transaction=False)
        pipe.mget([keys.lease(i) for i in ids])
        for consumer_id in ids:
            for name in QUEUES:
                pipe.llen(keys.processing(name, consumer_id))
        leases, *held = await pipe.execute()
        for index, name in enumerate(QUEUES):
            processing[name] = sum(int(n) for n in held[index :: len(QUEUES)])
        for consumer_id, lease in zip(ids, leases, strict=True):
            if lease is not None:
                about = orjson.loads(lease)
                consumers.append({"id": consumer_id, **about})

    stats: dict[str, Any] = {
        name: int(value or 0) for name, value in zip(COUNTERS, counters, strict=True)
    }
    stats["queues"] = dict(zip(QUEUES, map(int, depths), strict=True))
    stats["processing"] = processing
    stats["delayed"] = dict(zip(QUEUES, map(int, delayed), strict=True))
    stats["dead_letter"] = int(dead)
    stats["consumers"] = consumers
    stats["latency"] = {
        name: _latency(samples) for name, samples in zip(QUEUES, latencies, strict=True)
    }
    return stats


#: How many dead letters (the newest) :func:`dead_by_queue` reads to split the count by queue.
DEAD_SPLIT_LIMIT = 10_000


async def dead_by_queue(redis: aioredis.Redis, keys: Keys, total: int) -> dict[str, int]:
    """Dead letters per queue they came from, counting the newest :data:`DEAD_SPLIT_LIMIT`;
    any older ones (and any entry that cannot be read) count under ``"unknown"``."""
    counts = dict.fromkeys(QUEUES, 0)
    entries = await redis.lrange(keys.dead, 0, DEAD_SPLIT_LIMIT - 1) if total else []
    for raw in entries:
        try:
            queue = orjson.loads(raw).get("queue")
        except (orjson.JSONDecodeError, AttributeError):
            queue = None
        if queue in counts:
            counts[queue] += 1
    unknown = total - sum(counts.values())
    if unknown > 0:
        counts["unknown"] = unknown
    return counts
