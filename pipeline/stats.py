"""Reading the pipeline's state: counters, queue depths, jobs held, retries waiting, dead
letters, live consumers and recent latency percentiles."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from pipeline.keys import Keys
from pipeline.queue import HISTORY_BUCKET, HISTORY_SECONDS
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
class HistoryBucket:
    """One bucket of the dashboard's history: when it began (Unix seconds), the jobs done and
    failed in it, and the users signed up in it (None when not known)."""

    start: int
    done: int
    failed: int
    signups: int | None


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
    #: Per queue: seconds its oldest waiting job has waited (None: none waiting). Not in
    #: ``GET /stats``; the dashboard shows it.
    oldest_wait: Mapping[str, float | None] = field(default_factory=dict)
    #: Per queue: its dead letters, as the scripts count them (entries pushed by hand, or
    #: before the count was kept, are in ``dead_letter`` only). Not in ``GET /stats``.
    dead_by_queue: Mapping[str, int] = field(default_factory=dict)
    #: The last 15 minutes, oldest first, when asked for (the dashboard's chart).
    history: tuple[HistoryBucket, ...] = ()

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


# One snapshot (the dashboard reads it every refresh): this script, and in the same round trip
# an LRANGE of each queue's latency samples (returned through Lua, 3,000 samples cost Redis
# four times what the LRANGEs do).
# KEYS: stats, dead, consumers, dead-by-queue, then per queue: its list, its delayed set.
# ARGV: the lease key prefix, the history's key prefix, its bucket seconds, how many of the
# newest buckets the history spans (0: none) and the start of the newest the caller has already
# (buckets up to it are not read), then per queue its processing-list prefix, then the queues'
# names, then the counters.
# Returns: counters, dead letters, consumer ids, their last heartbeats, their leases (false
# when expired), Redis's time, the history read (per bucket, oldest first: its start, done,
# failed, users), then per queue: waiting, delayed, held (summed over every registered
# consumer), the oldest waiting job (false when none) and its dead letters.
_SNAPSHOT = """
local queues = (#KEYS - 4) / 2
local counters = {}
for i = 2 * queues + 6, #ARGV do counters[#counters + 1] = ARGV[i] end
local registered = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
local ids, beats, leases = {}, {}, {}
for i = 1, #registered, 2 do
  ids[#ids + 1], beats[#beats + 1] = registered[i], registered[i + 1]
  leases[#leases + 1] = redis.call('GET', ARGV[1] .. registered[i])
end
local time = redis.call('TIME')
local step, buckets, known = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = tonumber(time[1])
local history = {}
for b = buckets - 1, 0, -1 do
  local start = now - now % step - b * step
  if start > known then
    local found = redis.call('HMGET', ARGV[2] .. start, 'done', 'failed', 'users')
    history[#history + 1] = {start, found[1], found[2], found[3]}
  end
end
local reply = {
  redis.call('HMGET', KEYS[1], unpack(counters)), redis.call('LLEN', KEYS[2]), ids, beats,
  leases, time, history,
}
for q = 1, queues do
  local list, delayed = KEYS[3 + 2 * q], KEYS[4 + 2 * q]
  local held = 0
  for _, id in ipairs(ids) do held = held + redis.call('LLEN', ARGV[5 + q] .. id) end
  reply[#reply + 1] = {
    redis.call('LLEN', list), redis.call('ZCARD', delayed), held,
    redis.call('LINDEX', list, -1), redis.call('HGET', KEYS[4], ARGV[5 + queues + q]) or 0,
  }
end
return reply
"""

_SNAPSHOT_SHA: Final = hashlib.sha1(_SNAPSHOT.encode()).hexdigest()


@dataclass(slots=True)
class HistoryCache:
    """The history buckets a dashboard has read that can no longer change: a consumer adds to
    the bucket Redis's clock is in, so once the clock has left one, it is final. With it, a
    refresh reads only the current bucket (and the one just closed) instead of all 91."""

    #: start -> (done, failed, users) as read.
    rows: dict[int, tuple[Any, Any, Any]] = field(default_factory=dict)

    @property
    def known(self) -> int:
        """The start of the newest bucket held (0: none): every one of the window up to it is
        held, since the first read filled the window and it only moves forward."""
        return max(self.rows, default=0)

    def merge(self, read: Sequence[Sequence[Any]], now: int, buckets: int) -> list[Any]:
        """The window of ``buckets`` ending at Redis's ``now``, oldest first, from the rows
        just ``read`` and those held; keeps the final ones, forgets those out of the window."""
        current = now - now % HISTORY_BUCKET
        starts = [current - b * HISTORY_BUCKET for b in range(buckets - 1, -1, -1)]
        fresh = {int(row[0]): tuple(row[1:]) for row in read}
        window = [
            (start, *(fresh.get(start) or self.rows.get(start, (None,) * 3))) for start in starts
        ]
        self.rows.update((start, row) for start, row in fresh.items() if start < current)
        for start in [s for s in self.rows if s < starts[0]]:
            del self.rows[start]
        return window


async def read_stats(
    redis: aioredis.Redis,
    keys: Keys,
    registry: Registry,
    *,
    history: bool | HistoryCache = False,
) -> PipelineStats:
    """Everything, in one round trip, for the queues and counters of ``registry``; with
    ``history``, the dashboard's history too (the last 15 minutes), reading only the buckets
    a :class:`HistoryCache` given does not hold."""
    cache = history if isinstance(history, HistoryCache) else HistoryCache()
    queues, counters = registry.queues, registry.counters
    script_keys = [keys.stats, keys.dead, keys.consumers, keys.dead_by_queue]
    for name in queues:
        script_keys += [keys.queue(name), keys.delayed(name)]
    buckets = HISTORY_SECONDS // HISTORY_BUCKET + 1 if history else 0  # +1: the users delta
    args: list[str | int] = [
        keys.lease_prefix, keys.history_prefix, HISTORY_BUCKET, buckets, cache.known,
        *map(keys.processing_prefix, queues), *queues, *counters,
    ]  # fmt: skip

    def snapshot() -> Any:
        pipe = redis.pipeline(transaction=False)
        pipe.evalsha(_SNAPSHOT_SHA, len(script_keys), *script_keys, *args)
        for name in queues:
            pipe.lrange(keys.latency(name), 0, -1)
        return pipe.execute()

    try:
        replies = await snapshot()
    except NoScriptError:  # a restarted or new server: load it, once
        await redis.script_load(_SNAPSHOT)
        replies = await snapshot()
    (counted, dead, ids, beats, leases, now, past, *per_queue), *samples = replies
    live = [
        LiveConsumer(text(consumer_id), {**orjson.loads(lease), "heartbeat_at": float(beat)})
        for consumer_id, beat, lease in zip(ids, beats, leases, strict=True)
        if lease is not None
    ]
    clock = int(now[0]) + int(now[1]) / 1e6
    return PipelineStats(
        counters={name: int(value or 0) for name, value in zip(counters, counted, strict=True)},
        queues={name: int(found[0]) for name, found in zip(queues, per_queue, strict=True)},
        processing={name: int(found[2]) for name, found in zip(queues, per_queue, strict=True)},
        delayed={name: int(found[1]) for name, found in zip(queues, per_queue, strict=True)},
        dead_letter=int(dead),
        dead_by_queue={name: int(found[4]) for name, found in zip(queues, per_queue, strict=True)},
        consumers=tuple(live),
        latency={name: QueueLatency.of(found) for name, found in zip(queues, samples, strict=True)},
        oldest_wait={
            name: _waited(found[3], clock) for name, found in zip(queues, per_queue, strict=True)
        },
        history=_history(cache.merge(past, int(now[0]), buckets)) if buckets else (),
    )


def _history(rows: Sequence[Sequence[Any]]) -> tuple[HistoryBucket, ...]:
    """The buckets read, oldest first, but the first, which only gives the users counted
    before the second: each with the signups since the bucket before (None when either has
    no note of the users counted)."""
    found = []
    for before, (start, done, failed, users) in itertools.pairwise(rows):
        known = users is not None and before[3] is not None
        signups = int(users) - int(before[3]) if known else None
        found.append(HistoryBucket(int(start), int(done or 0), int(failed or 0), signups))
    return tuple(found)


def _waited(raw: bytes | None, now: float) -> float | None:
    """How long the job ``raw`` has waited by ``now`` (Redis's clock), in seconds; None for
    no job, or one whose envelope cannot be read."""
    if raw is None:
        return None
    try:
        return max(0.0, now - float(orjson.loads(raw)["enqueued_at"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


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
