"""A welcome SMS to every new user, sent through your messaging gateway."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from pipeline.config import setting, url
from pipeline.context import Context, Resource
from pipeline.handling import payload_text
from pipeline.jobs import Job
from pipeline.queue import JobSink
from pipeline.registry import JobType, Reaction
from pipeline.signals import user_signed_up

logger = logging.getLogger(__name__)
COUNTER: Final = "sms_sent"


@dataclass(frozen=True, slots=True)
class SmsSettings:
    gateway_url: str | None = setting(
        "SMS_GATEWAY_URL",
        url("http"),
        None,
        kind="URL",
        read_by="consumers",
        doc="where welcome SMSes are POSTed as JSON `{user_id, text}`; unset: to the log",
    )


class Gateway:
    """POSTs each message to the gateway (which knows each user's phone number)."""

    def __init__(self, gateway_url: str | None) -> None:
        self.url = gateway_url

    async def send(self, user_id: str, text: str) -> None:
        if self.url is None:
            logger.info("SMS to user %s: %r (no SMS_GATEWAY_URL: not sent)", user_id, text)
            return
        parts = urlsplit(self.url)
        body = json.dumps({"user_id": user_id, "text": text}).encode()
        head = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            writer.write(head.encode() + body)
            status = (await reader.readline()).split(b" ")[1:2]
        finally:
            writer.close()
            await writer.wait_closed()
        if status != [b"200"]:
            raise RuntimeError(f"SMS gateway answered {status!r}")


GATEWAY: Final = Resource[Gateway]("sms gateway")


async def send_welcome_sms(ctx: Context, job: Job) -> None:
    """Text the new user, once: skip a job already done, mark it done once sent. (The
    consumer counts it in `sms_sent` when it acknowledges the job.)"""
    if await ctx.is_done(job.id):
        return
    text = f"Welcome, {payload_text(job, 'username')}!"
    await ctx[GATEWAY].send(payload_text(job, "user_id"), text)
    await ctx.mark_done(job.id)


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
    ctx[GATEWAY] = Gateway(ctx.settings_of(SmsSettings).gateway_url)
    logger.info("SMS gateway: %s", ctx[GATEWAY].url or "none (the log)")


async def close_gateway(ctx: Context) -> None:
    if ctx.pop(GATEWAY) is not None:
        logger.info("SMS gateway closed")


REACTION: Final = Reaction(
    "welcome_sms",
    job_types=[WELCOME_SMS],
    receivers={user_signed_up: [enqueue_welcome_sms]},
    settings=SmsSettings,
    startup=open_gateway,
    shutdown=close_gateway,
    description="A welcome SMS to every new user.",
)
