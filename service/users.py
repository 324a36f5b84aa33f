"""Users in Redis: the atomic signup commit, and reading a user back.

A signup's receivers push their jobs into a :class:`SignupJobs` unit of work; :meth:`UserStore.
create` then writes the uniqueness claims, the user record and every job in ONE Lua script:
all of it or none of it, in one round trip. The signups that commit together share that
script's call (see _CREATE_USERS), each answered as if it had a call of its own.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import orjson
import redis.asyncio as aioredis

from pipeline import tracing
from pipeline.batching import MergedScript
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

# The signups that reach their commit while the one before is out go to Redis in ONE call of
# this script (a MergedScript): so its fixed cost, the claims' reads, the rate limit's state
# and one push per queue are paid once per call, not per signup. Its named keys and arguments
# are shared by every signup of the call (the rate limit brings its own); then come the
# signups' keys (_SIGNUP's each), the queues their jobs go to, and the signups' arguments:
# _SIGNUP's each, the last their count of jobs, then a (queue's number, job) pair per job.
# "fingerprint" is "" without an Idempotency-Key (whose key is then named but never read or
# written); "record_ttl" is the record's lifetime in ms and "created" the 201's body.
_SIGNATURE = (
    Signature(
        keys=("username_claims", "email_claims", "stats"),
        args=("signups", "record_ttl"),
    )
    + RATE_LIMIT_SIGNATURE
)
# Each signup's own keys and arguments, by name as the rest (the script reads them at their
# offset in the signup's block).
_SIGNUP = Signature(
    keys=("user", "rate_state", "idempotency"),
    args=(
        "username_claim",
        "email_claim",
        "user_id",
        "username",
        "email",
        "created_at",
        "receiver_errors",
        "fingerprint",
        "created",
        "jobs",
    ),
)
# Returns one answer per signup, in order: "ok"; "replay <body>" when the idempotency key's
# record is there for this same request (nothing is written); "reused" when it is there for
# another request; "retry <ms>" when the client is over its limit; "limiter" when the limit's
# state cannot be read and the limit fails closed; or the name of the field whose claim is
# taken (by Redis, or by a signup before it in the call). Only "ok" writes the signup, and
# with it the idempotency key's record (its fingerprint, then the 201's body). A replay does
# not count against the rate limit. The signups are answered in order as if each had a call
# of its own; the writes of a call are made at its end, the first of them after every check
# (so a write refused for memory fails the call, and writes nothing).
_CREATE_USERS = _SIGNATURE.source(
    RATE_LIMIT_PART
    + """\
local n = tonumber($signups)
-- Where each signup's arguments start; its claims, read for the whole call at once.
local at, usernames, emails = {}, {}, {}
local a = $named_args + 1
for i = 1, n do
  at[i] = a
  usernames[i], emails[i] = ARGV[a + $username_claim], ARGV[a + $email_claim]
  a = a + $signup_args + 2 * tonumber(ARGV[a + $jobs])
end
local held_u = redis.call('HMGET', $username_claims, unpack(usernames))
local held_e = redis.call('HMGET', $email_claims, unpack(emails))
local taken_u, taken_e = {}, {}
for i = 1, n do
  if held_u[i] then taken_u[usernames[i]] = true end
  if held_e[i] then taken_e[emails[i]] = true end
end
local queues = $named_keys + $signup_keys * n
local answers, users, claims_u, claims_e, pushes, records = {}, {}, {}, {}, {}, {}
local receiver_errors = 0
for i = 1, n do
  local a, k = at[i], $named_keys + $signup_keys * (i - 1)
  local fingerprint, record_key = ARGV[a + $fingerprint], KEYS[k + $idempotency]
  local answer
  if fingerprint ~= '' then
    local record = records[record_key] or redis.call('GET', record_key)
    if record then
      if string.sub(record, 1, 64) == fingerprint then
        answer = 'replay ' .. string.sub(record, 65)
      else
        answer = 'reused'
      end
    end
  end
  answer = answer or rate_admit(KEYS[k + $rate_state])
  if answer == nil then
    local username, email = usernames[i], emails[i]
    if taken_u[username] then
      answer = 'username'
    elseif taken_e[email] then
      answer = 'email'
    else
      answer = 'ok'
      taken_u[username], taken_e[email] = true, true
      local id = ARGV[a + $user_id]
      claims_u[#claims_u + 1], claims_u[#claims_u + 2] = username, id
      claims_e[#claims_e + 1], claims_e[#claims_e + 2] = email, id
      users[#users + 1] = i
      receiver_errors = receiver_errors + tonumber(ARGV[a + $receiver_errors])
      for j = 1, tonumber(ARGV[a + $jobs]) do
        local queue = tonumber(ARGV[a + $signup_args + 2 * j - 2])
        local list = pushes[queue]
        if list == nil then list = {}; pushes[queue] = list end
        list[#list + 1] = ARGV[a + $signup_args + 2 * j - 1]
      end
      if fingerprint ~= '' then
        records[record_key] = fingerprint .. ARGV[a + $created]
      end
    end
  end
  answers[i] = answer
end
rate_save()
if #users > 0 then
  redis.call('HSET', $username_claims, unpack(claims_u))
  redis.call('HSET', $email_claims, unpack(claims_e))
  for _, i in ipairs(users) do
    local a = at[i]
    redis.call('HSET', KEYS[$named_keys + $signup_keys * (i - 1) + $user], 'id',
               ARGV[a + $user_id], 'username', ARGV[a + $username], 'email', ARGV[a + $email],
               'created_at', ARGV[a + $created_at])
  end
  redis.call('HINCRBY', $stats, $USERS, #users)
  if receiver_errors > 0 then
    redis.call('HINCRBY', $stats, $RECEIVER_ERRORS, receiver_errors)
  end
  for queue, list in pairs(pushes) do
    redis.call('LPUSH', KEYS[queues + queue], unpack(list))
  end
  for key, record in pairs(records) do
    redis.call('SET', key, record, 'PX', $record_ttl)
  end
end
return answers
""",
    USERS=USERS,
    RECEIVER_ERRORS=RECEIVER_ERRORS,
    signup_keys=len(_SIGNUP.keys),
    signup_args=len(_SIGNUP.args),
    **{name: i for i, name in enumerate(_SIGNUP.keys, 1)},
    **{name: i for i, name in enumerate(_SIGNUP.args)},
)
#: The commit's span, with tracing on: one script call (shared with the signups that commit
#: together).
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


class _Signup(NamedTuple):
    """One signup's part of the commit script's call: its keys and arguments (_SIGNUP's, in
    order) and its jobs with their queues."""

    keys: list[Any]
    args: list[Any]
    jobs: list[tuple[str, Job]]


@dataclass(slots=True)
class NewUser:
    """What a signup writes. A value, as :class:`pipeline.jobs.Job` is (and not frozen for
    the same reason)."""

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
        # Signups that reach their commit while the one before is out share one script call
        # in one round trip, which ends with WAIT when replicas must confirm them.
        self._create: MergedScript[_Signup] = MergedScript(
            redis, _CREATE_USERS, self._call, min_replicas, replica_timeout
        )
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
        signup = _Signup(
            *_SIGNUP.call(
                {
                    "user": keys.user(user.user_id),
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
                    "created": created,
                    "jobs": len(jobs.queued),
                },
            ),
            jobs.queued,
        )
        try:
            with tracing.span(*_COMMIT_SPAN):
                result = bytes(await self._create(signup))
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

    def _call(self, signups: list[_Signup]) -> tuple[list[Any], list[Any]]:
        """The commit script's KEYS and ARGV for ``signups`` (see _CREATE_USERS)."""
        keys = self._keys
        script_keys, args = _SIGNATURE.call(
            {
                "username_claims": keys.username_claims,
                "email_claims": keys.email_claims,
                "stats": keys.stats,
            },
            {"signups": len(signups), "record_ttl": self._idempotency_ttl_ms, **self._limit},
        )
        queues: dict[str, int] = {}  # each queue's number, from 1
        for signup in signups:
            script_keys += signup.keys
            args += signup.args
            for queue, job in signup.jobs:
                args += (queues.setdefault(queue, len(queues) + 1), job.encode())
        script_keys += map(keys.queue, queues)
        return script_keys, args

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
