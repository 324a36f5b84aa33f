"""Users in Redis: the atomic signup commit, and reading a user back.

A signup's receivers push their jobs into a :class:`SignupJobs` unit of work; :meth:`UserStore.
create` then writes the uniqueness claims, the user record and every job in ONE Lua script:
all of it or none of it, in one round trip.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.batching import ScriptBatcher
from pipeline.errors import NotReplicatedError
from pipeline.jobs import Job, is_id, new_job
from pipeline.keys import Keys
from pipeline.outage import Outage
from pipeline.rate_limit import (
    RateLimit,
    RateLimitFailure,
    RefusedClients,
    script_args,
    script_part,
)
from pipeline.registry import JobType, Registry
from service.errors import (
    ConflictError,
    IdempotencyKeyReusedError,
    NotReplicatedApiError,
    RateLimitedError,
    UnavailableError,
)

logger = logging.getLogger(__name__)

# KEYS: username claims, email claims, user hash, stats hash, the client's rate-limit key, the
#       idempotency key's record, then one queue key per job.
# ARGV: username claim, email claim, user id, username, email, created_at, receiver errors,
#       the rate limit's three (pipeline.rate_limit.script_args), the request's fingerprint
#       ("": no idempotency key), the record's lifetime (ms), the 201's body, then one encoded
#       job per queue key.
# Returns "ok"; "replay <body>" when the idempotency key's record is there for this same
# request (nothing is written); "reused" when it is there for another request; "retry <ms>"
# when the client is over its limit; "limiter" when the limit's state cannot be read and the
# limit fails closed; or the name of the field whose claim is taken. Only "ok" writes the
# signup, and with it the idempotency key's record (its fingerprint, then the 201's body).
# A replay does not count against the rate limit.
_CREATE_USER = (
    """
if ARGV[11] ~= '' then
  local record = redis.call('GET', KEYS[6])
  if record then
    if string.sub(record, 1, 64) == ARGV[11] then return 'replay ' .. string.sub(record, 65) end
    return 'reused'
  end
end
"""
    + script_part(key="KEYS[5]", args=8)
    + """\
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'username' end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 'email' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[3], 'id', ARGV[3], 'username', ARGV[4], 'email', ARGV[5],
           'created_at', ARGV[6])
redis.call('HINCRBY', KEYS[4], 'users', 1)
if tonumber(ARGV[7]) > 0 then redis.call('HINCRBY', KEYS[4], 'receiver_errors', ARGV[7]) end
for i = 7, #KEYS do redis.call('LPUSH', KEYS[i], ARGV[i + 7]) end
if ARGV[11] ~= '' then redis.call('SET', KEYS[6], ARGV[11] .. ARGV[13], 'PX', ARGV[12]) end
return 'ok'
"""
)


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
        self._limit = script_args(rate_limit, rate_limit_failure)
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
        script_keys = [
            keys.username_claims,
            keys.email_claims,
            keys.user(user.user_id),
            keys.stats,
            keys.rate(client),
            keys.idempotency(idempotency_key) if idempotency_key is not None else self._unkeyed,
        ]
        script_keys += [keys.queue(queue) for queue, _ in jobs.queued]
        created = user.created()
        args: list[Any] = [
            user.username_claim,
            user.email_claim,
            user.user_id,
            user.username,
            user.email,
            repr(user.created_at),
            receiver_errors,
            *self._limit,
            user.fingerprint() if idempotency_key is not None else "",
            self._idempotency_ttl_ms,
            created,
        ]
        args += [job.encode() for _, job in jobs.queued]
        try:
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

    async def get(self, user_id: str) -> dict[str, Any] | None:
        """The user with its profile (None while not yet generated), or None if unknown."""
        if not is_id(user_id):
            return None
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._keys.user(user_id))
        pipe.get(self._keys.profile(user_id))
        record, profile = await pipe.execute()
        if not record:
            return None
        return {
            "user_id": record[b"id"].decode(),
            "username": record[b"username"].decode(),
            "email": record[b"email"].decode(),
            "created_at": float(record[b"created_at"]),
            "profile": orjson.loads(profile) if profile else None,
        }
