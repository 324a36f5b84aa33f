"""What each job type does. A handler raises on failure; the runner decides what follows.

Every handler is idempotent by job id: an effect stored in Redis is written in one script
together with the job's done-marker, so a job delivered twice (recovered from a consumer that
died, or retried after a failure) takes effect once."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from consumers.email import EmailBackend, welcome_email
from pipeline.batching import ScriptBatcher
from pipeline.connections import REDIS_UNAVAILABLE
from pipeline.errors import InvalidJobError
from pipeline.jobs import Job, is_id
from pipeline.keys import Keys
from pipeline.logs import mask_email
from pipeline.settings import Settings

logger = logging.getLogger(__name__)


def _once(effect: str) -> str:
    """A script doing ``effect`` only if job KEYS[1]'s done-marker was not set yet, and setting
    it (expiring after ARGV[1] s) in the same step. Returns 1 if it ran, 0 if already done."""
    return (
        "if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end\n"
        f"{effect}\nreturn 1"
    )


# KEYS: done, stats
_MARK_EMAIL_SENT = _once("redis.call('HINCRBY', KEYS[2], 'emails_sent', 1)")
# KEYS: done, marketing set, stats  ARGV: ttl, address, signed-up time
_ADD_TO_MARKETING = _once(
    "redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[2])\n"
    "redis.call('HINCRBY', KEYS[3], 'marketing_list_updates', 1)"
)
# KEYS: done, profile, stats  ARGV: ttl, profile JSON
_SAVE_PROFILE = _once(
    "redis.call('SET', KEYS[2], ARGV[2])\nredis.call('HINCRBY', KEYS[3], 'profiles_generated', 1)"
)

#: Waits between attempts to record that an email went out, when Redis fails right after the
#: SMTP server accepted it (beyond the client's own retries): a lost marker means a second email.
MARK_RETRY_DELAYS: Final = (0.1, 0.5, 1.0, 2.0)


class HandlerContext:
    """What handlers share: Redis and its scripts, the key names, the email backend and the
    sender address, and how long a job's done-marker lives.

    With ``min_replicas``, each effect (with its done-marker) is confirmed by that many
    replicas before its handler returns, as a signup is: an effect a failover could still
    lose raises :class:`NotReplicatedError`, so its job is put back rather than acknowledged,
    and runs again (once: the marker tells) wherever the effect did not survive."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        email: EmailBackend,
        email_from: str,
        idempotency_ttl: int = 24 * 3600,
        min_replicas: int = 0,
        replica_timeout: float = 0.5,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.email = email
        self.email_from = email_from
        self.idempotency_ttl = idempotency_ttl
        # Effects of jobs that finish in the same loop tick share one round trip.
        replicated = (min_replicas, replica_timeout)
        self.mark_email_sent = ScriptBatcher(redis, _MARK_EMAIL_SENT, *replicated)
        self.add_to_marketing = ScriptBatcher(redis, _ADD_TO_MARKETING, *replicated)
        self.save_profile = ScriptBatcher(redis, _SAVE_PROFILE, *replicated)

    @classmethod
    def for_settings(
        cls, redis: aioredis.Redis, email: EmailBackend, settings: Settings
    ) -> HandlerContext:
        """The context a consumer process runs its handlers with, from its settings."""
        return cls(
            redis,
            Keys(settings.key_prefix),
            email,
            settings.email_from,
            settings.idempotency_ttl,
            settings.redis_min_replicas,
            settings.redis_replica_timeout,
        )


Handler = Callable[[HandlerContext, Job], Awaitable[None]]


def payload_text(job: Job, name: str, max_length: int = 254) -> str:
    """A text field of the job's payload, checked before it goes into an email header, a log
    line or a Redis key: present, printable (no CR, LF or other control or format
    character) and bounded. A job failing this can never succeed: :class:`InvalidJobError`
    dead-letters it at once. (The web validates the same values; this guards against jobs put
    on the queues by anything else.)"""
    value = job.payload.get(name)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise InvalidJobError(f"payload field {name!r} is missing, not text or too long")
    if not value.isprintable():
        raise InvalidJobError(f"payload field {name!r} holds a control or format character")
    return value


def payload_user_id(job: Job) -> str:
    """The payload's ``user_id``: 32 hexadecimal digits, as the web makes them (it is part of
    a Redis key)."""
    value = payload_text(job, "user_id", 32)
    if not is_id(value):
        raise InvalidJobError("payload field 'user_id' is not 32 hexadecimal digits")
    return value


async def send_welcome_email(ctx: HandlerContext, job: Job) -> None:
    """Email the new user unless this job already did, then mark it done and count it.

    The marker is written right after the SMTP server accepts the message; a crash between
    the two is the one window in which the email can go out twice."""
    done = ctx.keys.done(job.id)
    if await ctx.redis.exists(done):
        logger.info("job %s: welcome email already sent; skipping", job.id)
        return
    email, username = payload_text(job, "email"), payload_text(job, "username")
    await ctx.email.send(welcome_email(ctx.email_from, email, username))
    logger.info(
        "job %s: welcome email for user %s sent to %s",
        job.id,
        job.payload.get("user_id"),
        mask_email(email),
    )
    for delay in (*MARK_RETRY_DELAYS, None):
        try:
            await ctx.mark_email_sent(keys=[done, ctx.keys.stats], args=[ctx.idempotency_ttl])
            return
        except REDIS_UNAVAILABLE:
            if delay is None:
                raise
            logger.warning("job %s: email sent but not yet marked done; retrying", job.id)
            await asyncio.sleep(delay)


async def add_to_marketing_list(ctx: HandlerContext, job: Job) -> None:
    """Add the address to the marketing list (scored by signup time) and count it, once."""
    signed_up_at = float(job.payload.get("signed_up_at", job.enqueued_at))
    await ctx.add_to_marketing(
        keys=[ctx.keys.done(job.id), ctx.keys.marketing, ctx.keys.stats],
        args=[ctx.idempotency_ttl, payload_text(job, "email"), repr(signed_up_at)],
    )


async def generate_profile(ctx: HandlerContext, job: Job) -> None:
    """Write the user's generated profile and count it, once."""
    user_id = payload_user_id(job)
    profile = build_profile(payload_text(job, "username"), payload_text(job, "email"))
    await ctx.save_profile(
        keys=[ctx.keys.done(job.id), ctx.keys.profile(user_id), ctx.keys.stats],
        args=[ctx.idempotency_ttl, orjson.dumps(profile)],
    )


def build_profile(username: str, email: str, now: datetime | None = None) -> dict[str, Any]:
    """Display name and initials from the username, an avatar URL from the email's hash."""
    words = [word for word in re.split(r"[._\-]+", username) if word] or [username]
    display_name = " ".join(word[:1].upper() + word[1:] for word in words)
    initials = "".join(word[0] for word in words[:2]).upper()
    digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()
    created = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    return {
        "display_name": display_name,
        "initials": initials,
        "avatar_url": f"https://www.gravatar.com/avatar/{digest}?d=identicon&s=200",
        "created_at": created,
    }


#: Job type -> handler.
HANDLERS: dict[str, Handler] = {
    "welcome_email": send_welcome_email,
    "marketing_signup": add_to_marketing_list,
    "generate_profile": generate_profile,
}
