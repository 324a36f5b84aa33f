"""A receiver that may push a job type no reaction declares (a misspelling)."""

from __future__ import annotations

from typing import Any, Final

from pipeline.queue import JobSink
from pipeline.registry import Reaction
from pipeline.signals import user_signed_up


async def enqueue_welcome_emial(sender: Any, **extra: Any) -> None:
    jobs: JobSink = extra["jobs"]
    await jobs.push("welcome_emial", {"user_id": extra["user_id"]})


REACTION: Final = Reaction(
    "undeclared",
    receivers={user_signed_up: [enqueue_welcome_emial]},
    also_pushes=["welcome_emial"],
)
