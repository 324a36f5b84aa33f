"""What each job type does. A handler raises on failure; the runner decides what follows."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis

from consumers.email import EmailBackend, welcome_email
from pipeline.jobs import Job
from pipeline.keys import Keys


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """What handlers share: Redis, the key names, the email backend and the sender address."""

    redis: aioredis.Redis
    keys: Keys
    email: EmailBackend
    email_from: str


Handler = Callable[[HandlerContext, Job], Awaitable[None]]


async def send_welcome_email(ctx: HandlerContext, job: Job) -> None:
    """Email the new user, then count it."""
    payload = job.payload
    await ctx.email.send(welcome_email(ctx.email_from, payload["email"], payload["username"]))
    await ctx.redis.hincrby(ctx.keys.stats, "emails_sent", 1)


async def add_to_marketing_list(ctx: HandlerContext, job: Job) -> None:
    """Add the address to the marketing list (scored by signup time) and count it, atomically."""
    payload = job.payload
    signed_up_at = float(payload.get("signed_up_at", job.enqueued_at))
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.zadd(ctx.keys.marketing, {payload["email"]: signed_up_at}, nx=True)
    pipe.hincrby(ctx.keys.stats, "marketing_list_updates", 1)
    await pipe.execute()


async def generate_profile(ctx: HandlerContext, job: Job) -> None:
    """Write the user's generated profile and count it, atomically."""
    payload = job.payload
    profile = build_profile(payload["username"], payload["email"])
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.set(ctx.keys.profile(payload["user_id"]), orjson.dumps(profile))
    pipe.hincrby(ctx.keys.stats, "profiles_generated", 1)
    await pipe.execute()


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
