"""Users in Redis: the atomic signup commit, and reading a user back.

A signup's receivers push their jobs into a :class:`SignupJobs` unit of work; :meth:`UserStore.
create` then writes the uniqueness claims, the user record and every job in ONE Lua script:
all of it or none of it, in one round trip.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from pipeline import tracing
from pipeline.batching import ScriptBatcher
from pipeline.errors import NotReplicatedError
from pipeline.jobs import Job, is_id, new_job
from pipeline.keys import RECEIVER_ERRORS, USERS, Keys
from pipeline.outage import Outage
from pipeline.registry import JobType, Registry, UserField
from pipeline.scripts import Signature
from pipeline.settings import RateLimit, RateLimitFailure
from service.errors import (
    ConflictError,
    IdempotencyKeyReusedError,
    NotReplicatedApiError,
    RateLimitedError,
    UnavailableError,
)
from service.rate_limit import SCRIPT_PART as RATE_LIMIT_PART
from service.rate_limit import SIGNATURE as RATE_LIMIT_SIGNATURE
from service.rate_limit import RefusedClients
from service.rate_limit import script_args as rate_limit_args

logger = logging.getLogger(__name__)

# The signup: its keys and arguments by name (the rate limit brings its own), then one queue
# key and one encoded job per job. "fingerprint" is "" without an Idempotency-Key (whose key
# is then named but never read or written); "record_ttl" is the record's lifetime in ms and
# "created" the 201's body.
_SIGNATURE = (
    Signature(
        keys=("username_claims", "email_claims", "user", "stats", "idempotency"),
        args=(
            "username_claim",
            "email_claim",
            "user_id",
            "username",
            "email",
            "created_at",
            "receiver_errors",
            "fingerprint",
            "record_ttl",
            "created",
        ),
    )
    + RATE_LIMIT_SIGNATURE
)
# Returns "ok"; "replay <body>" when the idempotency key's record is there for this same
# request (nothing is written); "reused" when it is there for another request; "retry <ms>"
# when the client is over its limit; "limiter" when the limit's state cannot be read and the
# limit fails closed; or the name of the field whose claim is taken. Only "ok" writes the
# signup, and with it the idempotency key's record (its fingerprint, then the 201's body).
# A replay does not count against the rate limit.
_CREATE_USER = _SIGNATURE.source(
    """
if $fingerprint ~= '' then
  local record = redis.call('GET', $idempotency)
  if record then
    if string.sub(record, 1, 64) == $fingerprint then return 'replay ' .. string.sub(record, 65) end
    return 'reused'
  end
end
"""
    + RATE_LIMIT_PART
    + """\
if redis.call('HSETNX', $username_claims, $username_claim, $user_id) == 0 then
  return 'username'
end
if redis.call('HSETNX', $email_claims, $email_claim, $user_id) == 0 then
  redis.call('HDEL', $username_claims, $username_claim)  -- its claim, just made: undone
  return 'email'
end
redis.call('HSET', $user, 'id', $user_id, 'username', $username, 'email', $email,
           'created_at', $created_at)
redis.call('HINCRBY', $stats, $USERS, 1)
if tonumber($receiver_errors) > 0 then
  redis.call('HINCRBY', $stats, $RECEIVER_ERRORS, $receiver_errors)
end
for i = 1, #KEYS - $named_keys do
  redis.call('LPUSH', KEYS[$named_keys + i], ARGV[$named_args + i])
end
if $fingerprint ~= '' then
  redis.call('SET', $idempotency, $fingerprint .. $created, 'PX', $record_ttl)
end
return 'ok'
""",
    USERS=USERS,
    RECEIVER_ERRORS=RECEIVER_ERRORS,
)
#: The commit's span, with tracing on: one script (it shares its round trip with the other
#: signups of the same loop tick).
_COMMIT_SPAN: Final = ("signup commit", {"db.system.name": "redis", "db.operation.name": "EVALSHA"})


@dataclass(slots=True)
class SignupJobs:
    """The signup's unit of work: a JobSink that collects jobs, each with its queue, until
    the commit. A job type no reaction declares fails in the receiver that pushed it, with
    :class:`UnknownJobTypeError`, which fails the signup (a bug, not a reaction's failure)."""

    registry: Registry
    queued: list[tuple[str, Job]] = field(default_factory=list)

    async def push(self, job_type: JobType | str, payload: dict[str, Any]) -> Job:
        queue = self.registry.queue_for(job_type)
        job = new_job(str(job_type), payload)
        self.queued.append((queue, job))
        if tracing.tracer is not None:  # an event on the signup's span
            tracing.event(
                "job queued",
                {"job.type": job.type, "job.id": job.id, "messaging.destination.name": queue},
            )
        return job


@dataclass(frozen=True, slots=True)
class NewUser:
    """What a signup writes."""

    user_id: str
    username: str
    email: str
    created_at: float
    username_claim: str
    email_claim: str

    def created(self) -> bytes:
        """The body of its 201."""
        return orjson.dumps(
            {"user_id": self.user_id, "username": self.username, "email": self.email}
        )

    def fingerprint(self) -> str:
        """What an Idempotency-Key is checked against: the same key with another signup (other
        values, as stored) is refused. 64 hex digits."""
        return hashlib.sha256(f"{self.username}\n{self.email}".encode()).hexdigest()


class UserStore:
    """Users and their profiles under one key prefix."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        rate_limit: RateLimit | None = None,
        rate_limit_failure: RateLimitFailure = "closed",
        *,
        min_replicas: int = 0,
        replica_timeout: float = 0.5,
        idempotency_key_ttl: float = 86400.0,
        outage: Outage | None = None,
    ) -> None:
        self._redis = redis
        #: Where a signup the replicas did not confirm is noted (logged once per outage).
        self._outage = outage or Outage(logger, "answering 503", resuming="serving")
        self._keys = keys
        # Signups that reach their commit in the same loop tick share one round trip, which
        # ends with WAIT when replicas must confirm them.
        self._create = ScriptBatcher(redis, _CREATE_USER, min_replicas, replica_timeout)
        self._idempotency_ttl_ms = round(idempotency_key_ttl * 1000)
        # A signup without an Idempotency-Key still names a key there (never read or written).
        self._unkeyed = keys.idempotency("")
        self._limit = rate_limit_args(rate_limit, rate_limit_failure)
        # Clients refused for their rate limit, and until when (see RefusedClients).
        self._refused = RefusedClients()

    def admit(self, client: str) -> None:
        """Raise :class:`RateLimitedError` if this worker refused ``client`` a moment ago and
        its wait is not over: Redis would refuse it too, so no need to ask (or read the body)."""
        wait = self._refused.wait(client)
        if wait is not None:
            raise RateLimitedError(wait)

    async def create(
        self,
        user: NewUser,
        jobs: SignupJobs,
        receiver_errors: int,
        client: str,
        idempotency_key: str | None = None,
    ) -> bytes:
        """Commit the user with its jobs, counting the signup against ``client``'s rate limit;
        return the 201's body. With an ``idempotency_key`` already used for the same signup,
        nothing is written and the body is the original's.

        Raises :class:`ConflictError` when the username or email is taken,
        :class:`RateLimitedError` when ``client`` is over its limit,
        :class:`UnavailableError` when the limit's state cannot be read and it fails closed,
        and :class:`IdempotencyKeyReusedError` when the key was used for another signup; then
        nothing of the signup was written. :class:`NotReplicatedApiError` (a 503) means it was
        written but not confirmed by enough replicas in time.

        Cancelling the request cannot cut the commit short: the call is queued with the
        batcher, whose batch goes out whatever becomes of the request that awaits its result
        (a cancelled await only drops the answer), so the signup is written whole or not at
        all.
        """
        keys = self._keys
        created = user.created()
        script_keys, args = _SIGNATURE.call(
            {
                "username_claims": keys.username_claims,
                "email_claims": keys.email_claims,
                "user": keys.user(user.user_id),
                "stats": keys.stats,
                "rate_state": keys.rate(client),
                "idempotency": keys.idempotency(idempotency_key)
                if idempotency_key is not None
                else self._unkeyed,
            },
            {
                "username_claim": user.username_claim,
                "email_claim": user.email_claim,
                "user_id": user.user_id,
                "username": user.username,
                "email": user.email,
                "created_at": repr(user.created_at),
                "receiver_errors": receiver_errors,
                "fingerprint": user.fingerprint() if idempotency_key is not None else "",
                "record_ttl": self._idempotency_ttl_ms,
                "created": created,
                **self._limit,
            },
            tail_keys=[keys.queue(queue) for queue, _ in jobs.queued],
            tail_args=[job.encode() for _, job in jobs.queued],
        )
        try:
            with tracing.span(*_COMMIT_SPAN):
                result = bytes(await self._create(script_keys, args))
        except NotReplicatedError as exc:
            logger.debug("signup %s not confirmed by replicas: %s", user.user_id, exc)
            self._outage.failed(exc)
            raise NotReplicatedApiError(exc.acknowledged, exc.required) from exc
        if result == b"ok":
            return created
        if result.startswith(b"replay "):
            return result[7:]
        if result == b"reused":
            raise IdempotencyKeyReusedError()
        if result.startswith(b"retry "):
            seconds = int(result[6:]) / 1000
            self._refused.refuse(client, seconds)
            raise RateLimitedError(math.ceil(seconds))
        if result == b"limiter":
            logger.warning("the rate limit's state for %s cannot be read; failing closed", client)
            raise UnavailableError()
        raise ConflictError(result.decode())

    async def get(self, user_id: str, fields: Sequence[UserField] = ()) -> dict[str, Any] | None:
        """The user with the reactions' ``fields`` (each None while not yet written, like
        the profile), read in one round trip; None if unknown."""
        if not is_id(user_id):
            return None
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._keys.user(user_id))
        for user_field in fields:
            pipe.get(user_field.key(self._keys, user_id))
        record, *values = await pipe.execute()
        if not record:
            return None
        return {
            "user_id": record[b"id"].decode(),
            "username": record[b"username"].decode(),
            "email": record[b"email"].decode(),
            "created_at": float(record[b"created_at"]),
            **{f.name: orjson.loads(v) if v else None for f, v in zip(fields, values, strict=True)},
        }
