"""Reading the pipeline's state: counters, queue depths, jobs held, retries waiting, dead
letters, live consumers and recent latency percentiles."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis

from pipeline.keys import Keys
from pipeline.registry import Registry


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Nearest-rank percentiles in milliseconds; None before any sample."""

    p50: float | None
    p99: float | None

    @classmethod
    def of(cls, sorted_values: Sequence[float]) -> Percentiles:
        return cls(percentile(sorted_values, 0.5), percentile(sorted_values, 0.99))


@dataclass(frozen=True, slots=True)
class QueueLatency:
    """One queue's recent jobs: how many samples, their queue wait and their run time."""

    samples: int
    wait_ms: Percentiles
    run_ms: Percentiles

    @classmethod
    def of(cls, samples: Sequence[bytes]) -> QueueLatency:
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
        return cls(len(waits), Percentiles.of(waits), Percentiles.of(runs))


@dataclass(frozen=True, slots=True)
class LiveConsumer:
    """A consumer holding a live lease, and what it said about itself in its heartbeat."""

    id: str
    about: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, **self.about}


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """One snapshot of the pipeline: the stats hash's counters (the registry's, in order),
    per queue the jobs waiting, held by consumers and waiting for a retry, the dead letters,
    the live consumers and the recent latency per queue."""

    counters: Mapping[str, int]
    queues: Mapping[str, int]
    processing: Mapping[str, int]
    delayed: Mapping[str, int]
    dead_letter: int
    consumers: tuple[LiveConsumer, ...]
    latency: Mapping[str, QueueLatency]

    def to_json(self, consumers: Literal["count", "list"] = "list") -> dict[str, Any]:
        """The JSON of ``GET /stats`` (``consumers="count"``: hosts and pids are for
        operators) and of ``python -m consumers stats --json`` (``"list"``)."""
        return {
            **self.counters,
            "queues": dict(self.queues),
            "processing": dict(self.processing),
            "delayed": dict(self.delayed),
            "dead_letter": self.dead_letter,
            "consumers": len(self.consumers)
            if consumers == "count"
            else [c.to_json() for c in self.consumers],
            "latency": {
                queue: {
                    "samples": found.samples,
                    "wait_ms": {"p50": found.wait_ms.p50, "p99": found.wait_ms.p99},
                    "run_ms": {"p50": found.run_ms.p50, "p99": found.run_ms.p99},
                }
                for queue, found in self.latency.items()
            },
        }


def text(value: object) -> str:
    """A Redis reply as text (the clients here do not decode replies)."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_stats(redis: aioredis.Redis, keys: Keys, registry: Registry) -> PipelineStats:
    """Everything in two round trips, for the queues and counters of ``registry``."""
    queues, counters = registry.queues, registry.counters
    pipe = redis.pipeline(transaction=False)
    pipe.hmget(keys.stats, list(counters))
    for name in queues:
        pipe.llen(keys.queue(name))
    for name in queues:
        pipe.zcard(keys.delayed(name))
    pipe.llen(keys.dead)
    pipe.zrange(keys.consumers, 0, -1)
    for name in queues:
        pipe.lrange(keys.latency(name), 0, -1)
    replies = iter(await pipe.execute())
    counted = next(replies)
    depths = {name: int(next(replies)) for name in queues}
    delayed = {name: int(next(replies)) for name in queues}
    dead = int(next(replies))
    ids = [text(i) for i in next(replies)]
    latency = {name: QueueLatency.of(next(replies)) for name in queues}

    processing = dict.fromkeys(queues, 0)
    live: list[LiveConsumer] = []
    if ids:
        pipe = redis.pipeline(transaction=False)
        pipe.mget([keys.lease(i) for i in ids])
        for consumer_id in ids:
            for name in queues:
                pipe.llen(keys.processing(name, consumer_id))
        leases, *held = await pipe.execute()
        for index, name in enumerate(queues):
            processing[name] = sum(int(n) for n in held[index :: len(queues)])
        for consumer_id, lease in zip(ids, leases, strict=True):
            if lease is not None:
                live.append(LiveConsumer(consumer_id, orjson.loads(lease)))

    return PipelineStats(
        counters={name: int(value or 0) for name, value in zip(counters, counted, strict=True)},
        queues=depths,
        processing=processing,
        delayed=delayed,
        dead_letter=dead,
        consumers=tuple(live),
        latency=latency,
    )


#: How many dead letters (the newest) :func:`dead_by_queue` reads to split the count by queue.
DEAD_SPLIT_LIMIT = 10_000


async def dead_by_queue(
    redis: aioredis.Redis, keys: Keys, total: int, queues: Sequence[str]
) -> dict[str, int]:
    """Dead letters per queue they came from, counting the newest :data:`DEAD_SPLIT_LIMIT`;
    any older ones (and any entry that cannot be read) count under ``"unknown"``."""
    counts = dict.fromkeys(queues, 0)
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
