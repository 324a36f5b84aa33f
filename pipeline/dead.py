"""The dead-letter list: its entry (:class:`DeadLetter`, defined once), and listing,
requeueing and purging it.

Each entry is JSON: ``{"queue", "reason", "failed_at", "job"}`` plus, when the job could be
decoded, ``id``, ``type`` and ``attempts``, and ``error`` (the last exception) or
``deliveries`` (times it died with its consumer). ``job`` is the envelope as it was fetched.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from pipeline.errors import JobDecodeError
from pipeline.jobs import Job, decode
from pipeline.keys import Keys
from pipeline.registry import Registry

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


class DeadLetters:
    """The dead-letter list of one prefix."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, registry: Registry) -> None:
        self._redis = redis
        self._keys = keys
        self._routes = registry.routes
        self._requeue = redis.register_script(_REQUEUE)

    async def count(self) -> int:
        return int(await self._redis.llen(self._keys.dead))

    async def list(self, limit: int | None = None) -> list[DeadLetter]:
        """The newest ``limit`` entries (all when None), newest first."""
        end = -1 if limit is None else limit - 1
        entries = await self._redis.lrange(self._keys.dead, 0, end)
        return [
            DeadLetter.decode(raw if isinstance(raw, bytes) else raw.encode()) for raw in entries
        ]

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
