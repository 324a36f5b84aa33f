"""A receiver whose declaration says one thing and whose code pushes another: the start-up
check passes, and the push fails loudly in the request."""

from __future__ import annotations

from typing import Any, Final

from pipeline.queue import JobSink
from pipeline.registry import Reaction
from pipeline.signals import user_signed_up
from reactions.welcome_email import WELCOME_EMAIL


async def enqueue_second_email(sender: Any, **extra: Any) -> None:
    jobs: JobSink = extra["jobs"]
    await jobs.push("welcome_emial", {"user_id": extra["user_id"]})


REACTION: Final = Reaction(
    "misspelt",
    receivers={user_signed_up: [enqueue_second_email]},
    also_pushes=[WELCOME_EMAIL],
)
