"""A fourth reaction, complete in this one module: a welcome SMS.

Its receiver pushes ``welcome_sms`` onto a new queue, ``sms``; its handler sends through a
gateway its start-up hook opens (and its shutdown hook closes) and counts ``sms_sent`` into
the stats. The "gateway" keeps each message in a Redis list the test reads, and notes its own
opening and closing there, so the test sees the whole lifecycle through a real consumer."""

from __future__ import annotations

from typing import Any, Final

import redis.asyncio as aioredis

from pipeline.handling import count, once, payload_text
from pipeline.jobs import Job
from pipeline.queue import JobSink
from pipeline.registry import Context, JobType, Reaction, Resource
from pipeline.signals import user_signed_up

COUNTER: Final = "sms_sent"


class Gateway:
    """Sends an SMS by appending it to ``<prefix>:sms:outbox``."""

    def __init__(self, redis: aioredis.Redis, outbox: str) -> None:
        self._redis = redis
        self._outbox = outbox

    async def send(self, to: str, text: str) -> None:
        await self._redis.rpush(self._outbox, f"{to}: {text}")


GATEWAY: Final = Resource[Gateway]("sms gateway")

# KEYS: done, stats
_MARK_SENT = once(count(COUNTER, "KEYS[2]"))


async def send_welcome_sms(ctx: Context, job: Job) -> None:
    """Text the new user, once."""
    done = ctx.keys.done(job.id)
    if await ctx.read("EXISTS", done):
        return
    await ctx[GATEWAY].send(
        payload_text(job, "user_id"), f"Welcome, {payload_text(job, 'username')}!"
    )
    await ctx.effect(_MARK_SENT)(keys=[done, ctx.keys.stats], args=[ctx.done_ttl])


WELCOME_SMS: Final = JobType(
    "welcome_sms",
    queue="sms",
    handler=send_welcome_sms,
    attempts=3,
    timeout=10,
    counter=COUNTER,
    description="Text the new user a welcome.",
)


async def enqueue_welcome_sms(sender: Any, **extra: Any) -> None:
    """Queue the welcome SMS."""
    jobs: JobSink = extra["jobs"]
    await jobs.push(WELCOME_SMS, {"user_id": extra["user_id"], "username": extra["username"]})


async def open_gateway(ctx: Context) -> None:
    ctx[GATEWAY] = Gateway(ctx.redis, ctx.keys.of("sms", "outbox"))
    await ctx.redis.set(ctx.keys.of("sms", "gateway"), "open")


async def close_gateway(ctx: Context) -> None:
    if ctx.pop(GATEWAY) is not None:
        await ctx.redis.set(ctx.keys.of("sms", "gateway"), "closed")


REACTION: Final = Reaction(
    "sms",
    job_types=[WELCOME_SMS],
    receivers={user_signed_up: [enqueue_welcome_sms]},
    startup=open_gateway,
    shutdown=close_gateway,
    description="A welcome SMS to every new user.",
)
