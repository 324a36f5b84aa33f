"""A reaction that pushes for some signups only (user ids ending in an even hex digit, about
half): the load tester must still see the pipeline drained, and count what it did."""

from __future__ import annotations

from typing import Any, Final

from pipeline.context import Context
from pipeline.jobs import Job
from pipeline.queue import JobSink
from pipeline.registry import JobType, Reaction
from pipeline.signals import user_signed_up

COUNTER: Final = "notes_made"


async def make_note(ctx: Context, job: Job) -> None:
    """Nothing to do: the note is the count the consumer makes when it acknowledges the job."""


NOTE: Final = JobType("make_note", queue="notes", handler=make_note, counter=COUNTER)


async def enqueue_note(sender: Any, **extra: Any) -> None:
    if int(extra["user_id"][-1], 16) % 2 == 0:
        jobs: JobSink = extra["jobs"]
        await jobs.push(NOTE, {"user_id": extra["user_id"]})


REACTION: Final = Reaction(
    "sometimes", job_types=[NOTE], receivers={user_signed_up: [enqueue_note]}
)
