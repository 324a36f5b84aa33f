"""Queue operations both sides use: push, and the consumer's fetch, settle, lease and recovery.

Queues are lists, LPUSH in and popped from the right, so each is FIFO; "the head" below is the
right end, the next job fetched. Two delivery modes:

- ``at-most-once``: BRPOP. A job is out of Redis while it runs; a consumer killed mid-job
  loses it.
- ``at-least-once``: BLMOVE into the consumer's own processing list, removed when the job is
  settled (done, retried, dead-lettered or returned), in one script with whatever comes next.
  Each consumer keeps a lease (a key with a short expiry, renewed by its heartbeat). A consumer
  whose lease has expired is dead: any other consumer moves the jobs of its processing lists
  back to the head of their queues, atomically, counting each job's deliveries; a job that has
  now died with its consumer ``MAX_DELIVERIES`` times is dead-lettered instead.

Retries wait in a per-queue sorted set scored by when they are due (Redis time); a promoter
moves due jobs to the head of their queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal, NamedTuple, Protocol

import orjson
import redis.asyncio as aioredis

from pipeline.batching import AutoPipeline
from pipeline.dead import LUA_DEAD_COUNTS, lua_entry
from pipeline.jobs import Job, new_job
from pipeline.keys import DEAD_LETTERS_DROPPED, Keys
from pipeline.registry import JobType, Registry
from pipeline.scripts import Signature
from pipeline.settings import DEAD_LETTER_MAX, IDEMPOTENCY_TTL, DeliveryMode

#: Latency samples kept per queue (the newest), for the percentiles in /stats.
LATENCY_SAMPLES: Final = 1000
#: How often a consumer writes the latency samples of the jobs it finished.
LATENCY_FLUSH_INTERVAL: Final = 1.0
#: The history the dashboard charts: jobs done and failed, and users counted, in buckets of
#: this many seconds, each kept for HISTORY_SECONDS plus one bucket (bounded: 91 keys).
HISTORY_BUCKET: Final = 10
HISTORY_SECONDS: Final = 15 * 60
#: Due retries moved per promoter call and queue.
PROMOTE_BATCH: Final = 100

SettleAction = Literal["return", "retry", "dead"]


class JobSink(Protocol):
    """Where a receiver pushes jobs: a signup's unit of work, or a queue directly."""

    async def push(self, job_type: JobType | str, payload: dict[str, Any]) -> Job:
        """Queue one job of ``job_type`` (a declared type, or its name); return it. A type no
        reaction declares raises :class:`UnknownJobTypeError`."""
        ...


class Ack(NamedTuple):
    """A job done, acknowledged with its fetch loop's next take: its bytes as fetched, its id
    (whose deliveries are forgotten), the stats counter its type keeps ('' for none), to
    which the acknowledgement adds one, and the done-marker its handler set ('' for none:
    see :meth:`pipeline.context.Context.mark_done`), written by the acknowledgement only if
    the job is no longer this consumer's (see ``_ACK_AND_TAKE``)."""

    raw: bytes
    job_id: str
    counter: str = ""
    marker: str = ""


class DirectQueue:
    """A :class:`JobSink` that LPUSHes each job at once: for scripts and tests, outside a
    request. Inside a request the signup's unit of work collects the jobs instead."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, registry: Registry) -> None:
        self._redis = redis
        self._keys = keys
        self._registry = registry

    async def push(self, job_type: JobType | str, payload: dict[str, Any]) -> Job:
        queue = self._registry.queue_for(job_type)
        job = new_job(str(job_type), payload)
        await self._redis.lpush(self._keys.queue(queue), job.encode())
        return job


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def new_consumer_id() -> str:
    """A consumer id that says where it runs: ``host-pid-random``."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# Settle a fetched job: take it off the consumer's processing list (at-least-once) and, only
# if it was still there, do what follows in the same step. A job no longer there was recovered
# from this consumer (its lease lapsed) and belongs to someone else now. Reads come first and
# removals last: before Redis 7 an OOM refusal hits a script at its first memory-growing write,
# so no job is ever removed from one place without being added to the other.
# A dead letter beyond the newest DEAD_LETTER_MAX drops the oldest, counted in the stats hash.
# "held": '1' at-least-once; "raw": the job's bytes as fetched; "put": the bytes to put at
# "destination" (its queue, the delayed set or the dead list); "delay": a retry's, in s; "id":
# the job id whose deliveries are forgotten ('' for none); "dead_max": most dead letters kept;
# "marker": the done-marker its handler set ('' for none), written first and whether or not the
# job is still held (the effect it marks happened), for "marker_ttl" s.
_SETTLE_SIGNATURE = Signature(
    keys=("processing", "destination", "deliveries", "stats", "dead_by_queue"),
    args=(
        "held", "raw", "action", "put", "delay", "id", "dead_max", "queue", "marker",
        "marker_ttl",
    ),
)  # fmt: skip
_SETTLE = LUA_DEAD_COUNTS + _SETTLE_SIGNATURE.source(
    """
if $marker ~= '' then
  redis.call('SET', $marker, '1', 'EX', $marker_ttl)
end
local held = $held == '1'
if held and not redis.call('LPOS', $processing, $raw, 'RANK', -1) then
  return 0
end
local action = $action
if action == 'return' then
  redis.call('RPUSH', $destination, $put)
elseif action == 'dead' then
  redis.call('LPUSH', $destination, $put)
  redis.call('HINCRBY', $dead_by_queue, $queue, 1)
  local over = trim_dead($destination, $dead_by_queue, tonumber($dead_max))
  if over > 0 then
    redis.call('HINCRBY', $stats, $DEAD_LETTERS_DROPPED, over)
  end
elseif action == 'retry' then
  local t = redis.call('TIME')
  local due = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber($delay)
  redis.call('ZADD', $destination, due, $put)
end
if held then
  redis.call('LREM', $processing, -1, $raw)
end
if $id ~= '' then
  redis.call('HDEL', $deliveries, $id)
end
return 1
""",
    DEAD_LETTERS_DROPPED=DEAD_LETTERS_DROPPED,
)

# Acknowledge finished jobs and take up to ARGV[1] more without blocking, in one step: under
# load a consumer makes one round trip per batch, not two per job. An ack that still finds its
# job removes it, which ends the job's deliveries: nothing can run it again, so the done-marker
# its handler set is not written (no key a job). An ack whose job is gone (recovered from this
# consumer after its lease lapsed, and now another's) writes it, for the delivery that holds
# the job now: the effect it marks happened. Each ack that finds its job adds one to its
# type's counter (one HINCRBY per counter and batch): a job is acknowledged once, however
# often it was delivered, so it counts once; the consumer now holding a gone job counts it.
# Before any removal come the lookups (which acks' jobs are gone, for those with a marker) and
# the writes that grow memory (markers, counts: the counts as if every other ack found its
# job, taken back for any that did not); the removals come last: an OOM refusal, which hits
# a script at its first memory-growing write, then refuses the whole step. The batch moves as
# a whole (three commands, not an LMOVE per job), leaving both lists as that many LMOVEs
# would: the head of the queue first in the reply and nearest the processing list's pop end.
# The copy comes before the trim, so an OOM refusal there (at LPUSH) leaves the acks done and
# nothing taken.
# KEYS: queue, processing list, deliveries hash, stats hash
# ARGV: how many to take, how many acks n, the done-markers' lifetime in s, then n job bytes,
# their n ids, their n counters ('' for none), their n done-marker keys ('' for none)
# Returns {acks that found their job, taken job bytes...}
_ACK_AND_TAKE = """
local n = tonumber(ARGV[2])
local gone = {}
for i = 4, 3 + n do
  if ARGV[i + 3 * n] ~= '' and not redis.call('LPOS', KEYS[2], ARGV[i], 'RANK', -1) then
    gone[i] = true
    redis.call('SET', ARGV[i + 3 * n], '1', 'EX', ARGV[3])
  end
end
local counted = {}
for i = 4, 3 + n do
  local counter = ARGV[i + 2 * n]
  if counter ~= '' and not gone[i] then counted[counter] = (counted[counter] or 0) + 1 end
end
for counter, k in pairs(counted) do
  redis.call('HINCRBY', KEYS[4], counter, k)
end
local removed = 0
for i = 4, 3 + n do
  if not gone[i] then
    if redis.call('LREM', KEYS[2], -1, ARGV[i]) == 1 then
      removed = removed + 1
    elseif ARGV[i + 2 * n] ~= '' then
      redis.call('HINCRBY', KEYS[4], ARGV[i + 2 * n], -1)
    end
  end
end
if n > 0 then
  redis.call('HDEL', KEYS[3], unpack(ARGV, 4 + n, 3 + 2 * n))
end
local count = tonumber(ARGV[1])
if count < 1 then return {removed} end
local batch = redis.call('LRANGE', KEYS[1], -count, -1)
local k = #batch
if k == 0 then return {removed} end
local taken = {}
for i = k, 1, -1 do
  taken[#taken + 1] = batch[i]
end
redis.call('LPUSH', KEYS[2], unpack(taken))
redis.call('LTRIM', KEYS[1], 0, -k - 1)
table.insert(taken, 1, removed)
return taken
"""

# Add a consumer's jobs done and failed to the current history bucket (Redis's clock), note
# the users counted when the bucket began (the first note wins), and keep the bucket for the
# history's length. KEYS: stats  ARGV: history prefix, bucket seconds, ttl, done, failed
_HISTORY = """
local now = tonumber(redis.call('TIME')[1])
local key = ARGV[1] .. (now - now % tonumber(ARGV[2]))
if tonumber(ARGV[4]) > 0 then redis.call('HINCRBY', key, 'done', ARGV[4]) end
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', key, 'failed', ARGV[5]) end
redis.call('HSETNX', key, 'users', redis.call('HGET', KEYS[1], 'users') or 0)
redis.call('EXPIRE', key, ARGV[3])
"""

# Renew a consumer's lease and note when it was last seen (Redis time). 1 if the lease was
# still held, 0 if it had lapsed (or this is the first heartbeat).
# KEYS: lease, consumers  ARGV: consumer id, lease value, lease ttl ms
_HEARTBEAT = """
local held = redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3], 'GET')
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], t[1], ARGV[1])
if held then return 1 end
return 0
"""

# Recover a consumer whose lease has expired: every job of its processing lists goes back to
# the head of its queue, oldest first in line, unless it has now been delivered to a consumer
# that died holding it max-deliveries times: then it is dead-lettered. Forgets the consumer
# once it has not been seen for forget-after seconds (0: at once). Reads, then additions, then
# removals (see _SETTLE).
# "max_deliveries": 0 does not count; "forget_after": in s. Then a (processing list, queue)
# pair of keys and the queue's name per queue.
# Returns {returned, dead-lettered}, or {-1, 0} if the lease is held.
_RECOVER_SIGNATURE = Signature(
    keys=("consumers", "lease", "deliveries", "dead", "stats", "dead_by_queue"),
    args=("consumer_id", "max_deliveries", "forget_after", "dead_max"),
)
_RECOVER = LUA_DEAD_COUNTS + _RECOVER_SIGNATURE.source(
    """
if redis.call('EXISTS', $lease) == 1 then
  return {-1, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local max = tonumber($max_deliveries)
local returned, dead = 0, 0
for i = 1, (#KEYS - $named_keys) / 2 do
  local processing = KEYS[$named_keys + 2 * i - 1]
  local queue, name = KEYS[$named_keys + 2 * i], ARGV[$named_args + i]
  -- Newest first: each RPUSH puts the job nearer the pop end, so the oldest ends up next.
  local jobs = redis.call('LRANGE', processing, 0, -1)
  for _, raw in ipairs(jobs) do
    local count, id = 0, nil
    if max > 0 then
      local ok, job = pcall(cjson.decode, raw)
      if ok and type(job) == 'table' and type(job.id) == 'string' then
        id = job.id
      else
        id = redis.sha1hex(raw)
      end
      count = redis.call('HINCRBY', $deliveries, id, 1)
    end
    if max > 0 and count >= max then
      redis.call('LPUSH', $dead, """
    + lua_entry(
        queue="name",
        id="id",
        deliveries="count",
        failed_at="now",
        job="raw",
        reason="'delivered ' .. count .. ' times, each to a consumer that died holding it'",
    )
    + """)
      redis.call('HINCRBY', $dead_by_queue, name, 1)
      redis.call('HDEL', $deliveries, id)
      dead = dead + 1
    else
      redis.call('RPUSH', queue, raw)
      returned = returned + 1
    end
  end
  if #jobs > 0 then
    redis.call('DEL', processing)
  end
end
if dead > 0 then
  local over = trim_dead($dead, $dead_by_queue, tonumber($dead_max))
  if over > 0 then
    redis.call('HINCRBY', $stats, $DEAD_LETTERS_DROPPED, over)
  end
end
local seen = redis.call('ZSCORE', $consumers, $consumer_id)
local forget = tonumber($forget_after)
if forget == 0 or (seen and now - tonumber(seen) > forget) then
  redis.call('ZREM', $consumers, $consumer_id)
end
return {returned, dead}
""",
    DEAD_LETTERS_DROPPED=DEAD_LETTERS_DROPPED,
)

# Move due retries to the head of their queue, the earliest due first in line.
# KEYS: delayed set, queue  ARGV: how many at most
_PROMOTE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #due == 0 then return 0 end
for i = #due, 1, -1 do
  redis.call('RPUSH', KEYS[2], due[i])
end
redis.call('ZREM', KEYS[1], unpack(due))
return #due
"""


def delivery_id(raw: bytes) -> str:
    """The id a job's deliveries are counted under, as ``_RECOVER`` computes it: the
    envelope's ``id`` when it has one, else the SHA-1 of its bytes (an undecodable job)."""
    try:
        job = orjson.loads(raw)
    except orjson.JSONDecodeError:
        job = None
    if isinstance(job, dict) and isinstance(job.get("id"), str):
        return str(job["id"])
    return hashlib.sha1(raw).hexdigest()


class Broker:
    """One consumer process's side of the queues: its id, its delivery mode, its scripts."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        mode: DeliveryMode = "at-least-once",
        consumer_id: str | None = None,
        dead_letter_max: int = DEAD_LETTER_MAX,
        queues: Sequence[str],
        pipeline: AutoPipeline | None = None,
        done_ttl: int = IDEMPOTENCY_TTL,
    ) -> None:
        self.redis = redis
        #: Every queue of the registry: what recovery looks for in a dead consumer's lists.
        self.queues = tuple(queues)
        self.keys = keys
        self.mode = mode
        self.dead_letter_max = dead_letter_max
        #: How long the done-markers written with settlements live, in s (IDEMPOTENCY_TTL).
        self.done_ttl = done_ttl
        self.consumer_id = consumer_id or new_consumer_id()
        self._held = mode == "at-least-once"
        #: Where takes go: shared with the handlers' effects (``Context.pipeline``), the
        #: takes of every queue and the effects of one tick share a round trip.
        self._pipeline = pipeline or AutoPipeline(redis)
        self._settle = redis.register_script(_SETTLE)
        self._ack_and_take = self._pipeline.script(_ACK_AND_TAKE)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._recover = redis.register_script(_RECOVER)
        self._promote = redis.register_script(_PROMOTE)
        self._history = redis.register_script(_HISTORY)

    # --- fetching and settling ----------------------------------------------------------

    async def fetch(self, queue: str, timeout: float) -> bytes | None:
        """Block up to ``timeout`` seconds for the oldest job of ``queue``."""
        source = self.keys.queue(queue)
        if self._held:
            raw = await self.redis.blmove(
                source,
                self.keys.processing(queue, self.consumer_id),
                timeout,  # type: ignore[arg-type]  # BLMOVE takes fractional seconds
                "RIGHT",
                "LEFT",
            )
        else:
            reply = await self.redis.brpop([source], timeout=timeout)
            raw = None if reply is None else reply[1]
        return None if raw is None else _bytes(raw)

    async def take(
        self, queue: str, count: int, acks: Sequence[Ack] = ()
    ) -> tuple[list[bytes], int]:
        """Acknowledge ``acks``, counting each under its counter, and take up to ``count``
        more jobs of ``queue`` without blocking, in one round trip. Returns the jobs taken and
        how many acks still found their job (fewer: some were recovered from this consumer
        meanwhile, and are counted by the consumer that holds them now, and their done-markers
        written for it). An ack that finds its job, or any at-most-once (its job left Redis when
        it was popped), writes no marker: nothing can deliver that job again."""
        if not self._held:
            return await self._pop(queue, count, acks), len(acks)
        keys = [
            self.keys.queue(queue),
            self.keys.processing(queue, self.consumer_id),
            self.keys.deliveries,
            self.keys.stats,
        ]
        args: list[bytes | str | int] = [count, len(acks), self.done_ttl]
        args += [ack.raw for ack in acks]
        args += [ack.job_id for ack in acks]
        args += [ack.counter for ack in acks]
        args += [ack.marker for ack in acks]
        # Not confirmed by replicas: a take a failover loses is recovered like any delivery.
        removed, *taken = await self._ack_and_take(keys, args, confirmed=False)
        return [_bytes(raw) for raw in taken], int(removed)

    async def _pop(self, queue: str, count: int, acks: Sequence[Ack]) -> list[bytes]:
        """At-most-once: count ``acks`` (one HINCRBY per counter) and pop up to ``count``
        jobs, in one round trip. Nothing is held, so nothing is removed, and no marker is
        written: a popped job is never delivered again."""
        counted = Counter(ack.counter for ack in acks if ack.counter)
        # Writes, but like a take not ones a WAIT need confirm.
        calls = [
            self._pipeline.queue(("HINCRBY", self.keys.stats, name, k), None, writes=False)
            for name, k in counted.items()
        ]
        if count > 0:
            # With a count, RPOP answers a list (or nil when the queue is empty).
            calls.append(
                self._pipeline.queue(("RPOP", self.keys.queue(queue), count), None, writes=False)
            )
        replies = await asyncio.gather(*calls)
        found = replies[-1] if count > 0 else None
        return [_bytes(raw) for raw in found or ()]

    async def held(self, queue: str) -> list[bytes]:
        """The jobs of ``queue`` in this consumer's processing list."""
        found = await self.redis.lrange(self.keys.processing(queue, self.consumer_id), 0, -1)
        return [_bytes(raw) for raw in found]

    # Each settlement writes ``marker``, the done-marker the job's handler set ('' for none).

    async def return_job(self, queue: str, raw: bytes, *, marker: str = "") -> bool:
        """Put an unfinished job back at the head of its queue, unchanged: it runs next."""
        return await self._do_settle(
            queue, raw, "return", self.keys.queue(queue), put=raw, marker=marker
        )

    async def retry(
        self, queue: str, raw: bytes, retried: Job, delay: float, *, marker: str = ""
    ) -> bool:
        """Schedule ``retried`` (the job with its next attempt) to run in ``delay`` seconds."""
        return await self._do_settle(
            queue,
            raw,
            "retry",
            self.keys.delayed(queue),
            put=retried.encode(),
            delay=delay,
            job_id=retried.id,
            marker=marker,
        )

    async def dead_letter(
        self, queue: str, raw: bytes, entry: bytes, job_id: str = "", *, marker: str = ""
    ) -> bool:
        """Move the job to the dead-letter list as ``entry`` (an encoded
        :class:`pipeline.dead.DeadLetter`)."""
        return await self._do_settle(
            queue, raw, "dead", self.keys.dead, put=entry, job_id=job_id, marker=marker
        )

    async def _do_settle(
        self,
        queue: str,
        raw: bytes,
        action: SettleAction,
        destination: str,
        *,
        put: bytes = b"",
        delay: float = 0.0,
        job_id: str = "",
        marker: str = "",
    ) -> bool:
        keys, args = _SETTLE_SIGNATURE.call(
            {
                "processing": self.keys.processing(queue, self.consumer_id),
                "destination": destination,
                "deliveries": self.keys.deliveries,
                "stats": self.keys.stats,
                "dead_by_queue": self.keys.dead_by_queue,
            },
            {
                "held": "1" if self._held else "0",
                "raw": raw,
                "action": action,
                "put": put,
                "delay": repr(delay),
                "id": job_id,
                "dead_max": self.dead_letter_max,
                "queue": queue,
                "marker": marker,
                "marker_ttl": self.done_ttl,
            },
        )
        return bool(await self._settle(keys=keys, args=args))

    # --- leases and recovery ------------------------------------------------------------

    async def heartbeat(self, ttl: float, about: dict[str, Any]) -> bool:
        """Take or renew this consumer's lease for ``ttl`` seconds. False if it had lapsed."""
        keys = [self.keys.lease(self.consumer_id), self.keys.consumers]
        args: list[str | bytes | int] = [
            self.consumer_id,
            orjson.dumps(about),
            max(1, int(ttl * 1000)),
        ]
        return bool(await self._heartbeat(keys=keys, args=args))

    async def release(self) -> tuple[int, int]:
        """Give up the lease and return whatever this consumer still holds. On a graceful stop."""
        await self.redis.delete(self.keys.lease(self.consumer_id))
        return await self.recover(self.consumer_id, max_deliveries=0, forget_after=0)

    async def recover(
        self, consumer_id: str, *, max_deliveries: int, forget_after: float
    ) -> tuple[int, int]:
        """Return the jobs of ``consumer_id`` if its lease has expired: (returned, dead-lettered),
        or (-1, 0) if it is alive."""
        tail_keys: list[str] = []
        for queue in self.queues:
            tail_keys += [self.keys.processing(queue, consumer_id), self.keys.queue(queue)]
        keys, args = _RECOVER_SIGNATURE.call(
            {
                "consumers": self.keys.consumers,
                "lease": self.keys.lease(consumer_id),
                "deliveries": self.keys.deliveries,
                "dead": self.keys.dead,
                "stats": self.keys.stats,
                "dead_by_queue": self.keys.dead_by_queue,
            },
            {
                "consumer_id": consumer_id,
                "max_deliveries": max_deliveries,
                "forget_after": forget_after,
                "dead_max": self.dead_letter_max,
            },
            tail_keys=tail_keys,
            tail_args=self.queues,
        )
        returned, dead = await self._recover(keys=keys, args=args)
        return int(returned), int(dead)

    async def expired_consumers(self) -> list[str]:
        """Other consumers still registered whose lease has expired."""
        registered = await self.redis.zrange(self.keys.consumers, 0, -1)
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in registered]
        ids = [i for i in ids if i != self.consumer_id]
        if not ids:
            return []
        leases = await self.redis.mget([self.keys.lease(i) for i in ids])
        return [i for i, lease in zip(ids, leases, strict=True) if lease is None]

    # --- retries and measurements ---------------------------------------------------------

    async def promote(self, queues: Iterable[str]) -> int:
        """Move due retries to the head of their queues; how many moved."""
        moved = 0
        for queue in queues:
            keys = [self.keys.delayed(queue), self.keys.queue(queue)]
            moved += int(await self._promote(keys=keys, args=[PROMOTE_BATCH]))
        return moved

    async def record_history(self, done: int, failed: int) -> None:
        """Add this consumer's jobs done and failed since the last call to the current history
        bucket (Redis's clock), noting the users counted when the bucket began."""
        await self._history(
            keys=[self.keys.stats],
            args=[self.keys.history_prefix, HISTORY_BUCKET, HISTORY_SECONDS + HISTORY_BUCKET,
                  done, failed],
        )  # fmt: skip

    async def record_latency(self, samples: Mapping[str, Sequence[tuple[float, float]]]) -> None:
        """Keep the newest samples of (queue wait, run time) in seconds, per queue."""
        pipe = self.redis.pipeline(transaction=False)
        for queue, pairs in samples.items():
            if not pairs:
                continue
            key = self.keys.latency(queue)
            pipe.lpush(key, *(f"{wait * 1e3:.3f} {run * 1e3:.3f}" for wait, run in pairs))
            pipe.ltrim(key, 0, LATENCY_SAMPLES - 1)
        if len(pipe):
            await pipe.execute()
