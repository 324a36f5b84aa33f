"""The dead-letter list: its entry (:class:`DeadLetter`, defined once), and listing,
requeueing and purging it.

Each entry is JSON: ``{"queue", "reason", "failed_at", "job"}`` plus, when the job could be
decoded, ``id``, ``type`` and ``attempts``, and ``error`` (the last exception) or
``deliveries`` (times it died with its consumer). ``job`` is the envelope as it was fetched.
"""

from __future__ import annotations

import builtins
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
import redis.asyncio as aioredis

from pipeline.errors import JobDecodeError
from pipeline.jobs import Job, decode
from pipeline.keys import Keys
from pipeline.registry import Registry

# Lua for every script that adds or removes dead letters: the dead-letter list's entries are
# counted per queue in a hash (Keys.dead_by_queue), so the dashboard reads them per refresh
# without reading the list. uncount(counts, queue) takes one off; trim_dead(dead, counts, max)
# drops the entries beyond the newest max, uncounting each, and returns how many it dropped.
LUA_DEAD_COUNTS: Final = """
local function uncount(counts, queue)
  if queue ~= '' and redis.call('HINCRBY', counts, queue, -1) <= 0 then
    redis.call('HDEL', counts, queue)
  end
end
local function trim_dead(dead, counts, max)
  local over = redis.call('LLEN', dead) - max
  if over <= 0 then return 0 end
  for _, raw in ipairs(redis.call('LRANGE', dead, max, -1)) do
    local ok, entry = pcall(cjson.decode, raw)
    if ok and type(entry) == 'table' and type(entry.queue) == 'string' then
      uncount(counts, entry.queue)
    end
  end
  redis.call('LTRIM', dead, 0, max - 1)
  return over
end
"""

# Move one entry back to its queue, only if it is still on the dead-letter list. The push
# comes before the removal, so a Redis out of memory refuses the script before it changes
# anything.
# KEYS: dead list, queue, dead-by-queue  ARGV: the entry's bytes, the job to push, the
# entry's queue ('' if it names none)
_REQUEUE = (
    LUA_DEAD_COUNTS
    + """
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LREM', KEYS[1], 1, ARGV[1])
uncount(KEYS[3], ARGV[3])
return 1
"""
)

# Delete one entry, if it is still there.
# KEYS: dead list, dead-by-queue  ARGV: the entry's bytes, its queue ('' if it names none)
_DELETE = (
    LUA_DEAD_COUNTS
    + """
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed > 0 then uncount(KEYS[2], ARGV[2]) end
return removed
"""
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter: the one definition of the entry, which the consumer writes
    (:meth:`for_job`), the recovery script writes (:func:`lua_entry`) and the operator's
    commands read (:meth:`decode`). Stored as JSON; ``job`` is the envelope as it was fetched
    (text), whatever it held."""

    queue: str | None
    reason: str | None
    failed_at: float | None
    job_text: str | None
    #: The job's id: from its envelope, or (an undecodable one) what its deliveries count under.
    id: str | None = None
    type: str | None = None
    #: Attempts made (a job that failed), or deliveries to consumers that died holding it.
    attempts: int | None = None
    error: str | None = None
    deliveries: int | None = None
    #: The entry's bytes as stored (what a requeue removes); empty for a new one.
    raw: bytes = b""

    @classmethod
    def for_job(
        cls,
        queue: str,
        raw: bytes,
        reason: str,
        *,
        job: Job | None = None,
        error: str | None = None,
    ) -> DeadLetter:
        """The dead letter of ``raw`` (decoded as ``job``, if it could be) fetched from
        ``queue``: why it died, and when."""
        return cls(
            queue=queue,
            reason=reason,
            failed_at=time.time(),
            job_text=raw.decode("utf-8", "backslashreplace"),
            id=job.id if job else None,
            type=job.type if job else None,
            attempts=job.attempt + 1 if job else None,
            error=error,
        )

    def to_json(self) -> dict[str, Any]:
        """The stored JSON object (fields that are None are left out)."""
        found = {name: getattr(self, attr) for name, attr in _JSON.items()}
        return {name: value for name, value in found.items() if value is not None}

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    @classmethod
    def decode(cls, raw: bytes) -> DeadLetter:
        """An entry as stored; what is missing or mistyped (an entry written by hand or by an
        older version) is None rather than an error."""
        try:
            fields = orjson.loads(raw)
        except orjson.JSONDecodeError:
            fields = {}
        if not isinstance(fields, dict):
            fields = {}

        def get(name: str, *kinds: type) -> Any:
            value = fields.get(name)
            ok = isinstance(value, kinds) and not isinstance(value, bool)
            return value if ok else None

        return cls(
            queue=get("queue", str),
            reason=get("reason", str),
            failed_at=get("failed_at", int, float),
            job_text=get("job", str),
            id=get("id", str),
            type=get("type", str),
            attempts=get("attempts", int),
            error=get("error", str),
            deliveries=get("deliveries", int),
            raw=raw,
        )

    @property
    def job(self) -> Job | None:
        """The job it holds, decoded; None if it cannot be."""
        if self.job_text is None:
            return None
        try:
            return decode(self.job_text.encode("utf-8", "surrogateescape"))
        except (JobDecodeError, UnicodeEncodeError):
            return None

    @property
    def job_id(self) -> str | None:
        job = self.job
        return job.id if job else self.id


#: JSON name -> attribute of :class:`DeadLetter` (only ``job`` differs).
_JSON: Final = {
    ("job" if f.name == "job_text" else f.name): f.name
    for f in dataclasses.fields(DeadLetter)
    if f.name != "raw"
}


def lua_entry(**fields: str) -> str:
    """The Lua expression encoding a :class:`DeadLetter` in a script, from Lua expressions by
    JSON name (``queue="name", id="id", ...``): the same entry :meth:`DeadLetter.encode`
    writes, its names checked against the one definition."""
    unknown = set(fields) - set(_JSON)
    if unknown:
        raise ValueError(f"not fields of a dead letter: {', '.join(sorted(unknown))}")
    return "cjson.encode({" + ", ".join(f"{name} = {expr}" for name, expr in fields.items()) + "})"


#: How many requeues go to Redis in one round trip when requeueing many.
REQUEUE_BATCH: Final = 500

#: What became of one entry a requeue was asked for.
Requeued = Literal["requeued", "gone", "undecodable", "unrouted"]


class DeadLetters:
    """The dead-letter list of one prefix: what the CLI's ``dead`` commands and the
    dashboard both use. An entry is named by its bytes as stored (``DeadLetter.raw``): an
    action on it happens only if exactly that entry is still on the list."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, registry: Registry) -> None:
        self._redis = redis
        self._keys = keys
        self._routes = registry.routes
        self._requeue = redis.register_script(_REQUEUE)
        self._delete = redis.register_script(_DELETE)

    async def count(self) -> int:
        return int(await self._redis.llen(self._keys.dead))

    async def list(self, limit: int | None = None) -> list[DeadLetter]:
        """The newest ``limit`` entries (all when None), newest first."""
        return (await self.page(0, limit))[1]

    async def page(self, offset: int, limit: int | None) -> tuple[int, builtins.list[DeadLetter]]:
        """How many there are, and ``limit`` entries (all when None) from ``offset``, newest
        first: one round trip, whatever the list's length."""
        end = -1 if limit is None else offset + limit - 1
        pipe = self._redis.pipeline(transaction=True)
        pipe.llen(self._keys.dead)
        pipe.lrange(self._keys.dead, offset, end)
        total, entries = await pipe.execute()
        return int(total), [DeadLetter.decode(_bytes(raw)) for raw in entries]

    def _fresh(self, entry: DeadLetter) -> tuple[Requeued, builtins.list[str], bytes]:
        """Whether ``entry`` can be requeued; if so, the script's keys and its job as a first
        attempt."""
        job = entry.job
        if job is None:
            return "undecodable", [], b""
        if job.type not in self._routes:
            return "unrouted", [], b""
        fresh = dataclasses.replace(job, attempt=0, enqueued_at=time.time())
        queue = self._keys.queue(self._routes[job.type])
        return "requeued", [self._keys.dead, queue, self._keys.dead_by_queue], fresh.encode()

    async def requeue_entry(self, entry: DeadLetter) -> Requeued:
        """Put ``entry``'s job back on its queue as a first attempt, if the entry is still on
        the list ("gone" if not) and its job can be decoded and routed."""
        verdict, keys, fresh = self._fresh(entry)
        if verdict != "requeued":
            return verdict
        done = await self._requeue(keys=keys, args=[entry.raw, fresh, entry.queue or ""])
        return "requeued" if int(done) else "gone"

    async def requeue(self, job_id: str | None = None) -> tuple[int, int]:
        """Put dead jobs back on their queue as a first attempt: the one with ``job_id``, or all
        when None. Returns (requeued, skipped): an entry whose job cannot be decoded, or whose
        type no queue serves, is skipped and stays. Many go in round trips of
        :data:`REQUEUE_BATCH`."""
        requeued = skipped = 0
        ready: builtins.list[tuple[builtins.list[str], builtins.list[bytes | str]]] = []
        for entry in await self.list():
            if job_id is not None and entry.job_id != job_id:
                continue
            verdict, keys, fresh = self._fresh(entry)
            if verdict != "requeued":
                skipped += 1
                continue
            ready.append((keys, [entry.raw, fresh, entry.queue or ""]))
        for start in range(0, len(ready), REQUEUE_BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for keys, args in ready[start : start + REQUEUE_BATCH]:
                await self._requeue(keys=keys, args=args, client=pipe)
            requeued += sum(int(done) for done in await pipe.execute())
        return requeued, skipped

    async def delete_entry(self, entry: DeadLetter) -> bool:
        """Delete ``entry``, if it is still on the list."""
        keys = [self._keys.dead, self._keys.dead_by_queue]
        return bool(int(await self._delete(keys=keys, args=[entry.raw, entry.queue or ""])))

    async def delete(self, job_id: str) -> int:
        """Delete the dead letters of the job ``job_id``; how many there were."""
        deleted = 0
        for entry in await self.list():
            if entry.job_id == job_id:
                deleted += await self.delete_entry(entry)
        return deleted

    async def purge(self) -> int:
        """Delete every dead letter; how many there were."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.llen(self._keys.dead)
        pipe.delete(self._keys.dead, self._keys.dead_by_queue)
        count, _ = await pipe.execute()
        return int(count)


def _bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()
