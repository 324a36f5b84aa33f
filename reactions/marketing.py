"""The marketing list: every new address joins it, scored by its signup time."""

from __future__ import annotations

from typing import Any, Final

from pipeline.context import Context
from pipeline.handling import payload_text
from pipeline.jobs import Job
from pipeline.queue import JobSink
from pipeline.registry import JobType, Reaction
from pipeline.signals import user_signed_up

#: The sorted set of subscribed addresses (``<prefix>:marketing``), scored by signup time.
LIST: Final = "marketing"
#: The stats counter of jobs done: addresses added.
COUNTER: Final = "marketing_list_updates"


async def add_to_marketing_list(ctx: Context, job: Job) -> None:
    """Add the address to the marketing list, scored by signup time, once per address without
    a done-marker: ``ZADD NX`` adds it only if it is not on the list yet."""
    signed_up_at = float(job.payload.get("signed_up_at", job.enqueued_at))
    await ctx.write("ZADD", ctx.keys.of(LIST), "NX", repr(signed_up_at), payload_text(job, "email"))


MARKETING_SIGNUP: Final = JobType(
    "marketing_signup",
    queue="marketing",
    handler=add_to_marketing_list,
    counter=COUNTER,
    description="Add the address to the marketing list.",
)


async def enqueue_marketing_signup(sender: Any, **extra: Any) -> None:
    """Queue the address's addition to the marketing list."""
    jobs: JobSink = extra["jobs"]
    await jobs.push(
        MARKETING_SIGNUP,
        {"user_id": extra["user_id"], "email": extra["email"], "signed_up_at": extra["created_at"]},
    )


REACTION: Final = Reaction(
    "marketing",
    job_types=[MARKETING_SIGNUP],
    receivers={user_signed_up: [enqueue_marketing_signup]},
    description="Every new address on the marketing list.",
)
