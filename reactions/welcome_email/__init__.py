"""The welcome email: queued at signup, sent by a consumer over SMTP (or to the log).

Its settings (``SMTP_*``, ``EMAIL_FROM``) are in :mod:`.settings`, its backends in
:mod:`.backends`."""

from __future__ import annotations

import asyncio
import html
import logging
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr, parseaddr
from typing import Any, Final

from pipeline.connections import REDIS_UNAVAILABLE
from pipeline.context import Context, Resource
from pipeline.handling import payload_text
from pipeline.jobs import Job
from pipeline.logs import mask_email
from pipeline.queue import JobSink
from pipeline.registry import JobType, Reaction
from pipeline.signals import user_signed_up
from reactions.welcome_email.backends import EmailBackend, email_backend
from reactions.welcome_email.settings import EmailSettings

logger = logging.getLogger(__name__)

#: Where welcome emails go: SMTP when ``SMTP_URL`` is set, else the log.
EMAIL: Final = Resource[EmailBackend]("email")
#: Waits between attempts to record that an email went out, when Redis fails right after the
#: SMTP server accepted it (beyond the client's own retries): a lost marker means a second email.
MARK_RETRY_DELAYS: Final = (0.1, 0.5, 1.0, 2.0)

#: The stats counter of jobs done: emails sent.
COUNTER: Final = "emails_sent"


def welcome_message(sender: str, to: str, username: str) -> Message:
    """The welcome email: a plain-text part and an HTML alternative, both naming the user.

    Built with the ``email.mime`` classes: the same message as ``EmailMessage`` with
    ``set_content`` / ``add_alternative``, in about 90 us instead of 700 (a consumer's CPU per
    email). Header text that is not ASCII is encoded here (RFC 2047), as that API would."""
    message = MIMEMultipart("alternative")
    name, address = parseaddr(sender)
    message["From"] = formataddr((name, address), charset="utf-8") if name else sender
    message["To"] = to
    message["Subject"] = Header(f"Welcome, {username}!", "utf-8").encode()
    message.attach(
        MIMEText(
            f"Hello {username},\n\nThanks for signing up. Your account is ready.\n\n-- The team\n",
            "plain",
            "utf-8",
        )
    )
    escaped = html.escape(username)
    message.attach(
        MIMEText(
            "<!doctype html>\n<html><body>\n"
            f"<p>Hello <strong>{escaped}</strong>,</p>\n"
            "<p>Thanks for signing up. Your account is ready.</p>\n"
            "<p>&mdash; The team</p>\n"
            "</body></html>\n",
            "html",
            "utf-8",
        )
    )
    return message


async def send_welcome_email(ctx: Context, job: Job) -> None:
    """Email the new user unless this job already did, then mark it done.

    The marker is written right after the SMTP server accepts the message (by default with
    the job's acknowledgement, see ``Context.mark_done``); a crash or a failover between the
    two is the one window in which the email can go out twice. With ``REDIS_MIN_REPLICAS``
    the marker is a write of its own, confirmed by replicas, and tried again here while Redis
    fails (a failover under way), so that it lands on the new primary rather than the job
    running again there."""
    if await ctx.is_done(job.id):
        logger.info("job %s: welcome email already sent; skipping", job.id)
        return
    email, username = payload_text(job, "email"), payload_text(job, "username")
    sender = ctx.settings_of(EmailSettings).email_from
    await ctx[EMAIL].send(welcome_message(sender, email, username))
    logger.info(
        "job %s: welcome email for user %s sent to %s",
        job.id,
        job.payload.get("user_id"),
        mask_email(email),
    )
    for delay in (*MARK_RETRY_DELAYS, None):
        try:
            await ctx.mark_done(job.id)
            return
        except REDIS_UNAVAILABLE:
            if delay is None:
                raise
            logger.warning("job %s: email sent but not yet marked done; retrying", job.id)
            await asyncio.sleep(delay)


WELCOME_EMAIL: Final = JobType(
    "welcome_email",
    queue="email",
    handler=send_welcome_email,
    counter=COUNTER,
    description="Send the welcome email (SMTP_URL, else the log).",
)


async def enqueue_welcome_email(sender: Any, **extra: Any) -> None:
    """Queue the welcome email."""
    jobs: JobSink = extra["jobs"]
    await jobs.push(
        WELCOME_EMAIL,
        {"user_id": extra["user_id"], "username": extra["username"], "email": extra["email"]},
    )


async def open_email(ctx: Context) -> None:
    """The consumer's start-up hook: the backend ``SMTP_URL`` asks for (it connects per
    message, so there is nothing to close)."""
    ctx[EMAIL] = email_backend(ctx.settings_of(EmailSettings))


REACTION: Final = Reaction(
    "welcome_email",
    job_types=[WELCOME_EMAIL],
    receivers={user_signed_up: [enqueue_welcome_email]},
    startup=open_email,
    settings=EmailSettings,
    description="A welcome email to every new user.",
)
