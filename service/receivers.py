"""Reactions to a signup. Each is a module-level async receiver that pushes one job.

A new reaction is a new receiver here (and a line in :func:`connect_receivers`); the signup
handler never changes for it. Inside a request the pushes join the signup's unit of work and
are committed with the user; elsewhere ``jobs`` may be a queue that pushes at once.
"""

from __future__ import annotations

from typing import Any

from blinker import Signal

from pipeline.queue import JobSink


async def enqueue_welcome_email(sender: Any, **extra: Any) -> None:
    """Queue the welcome email."""
    jobs: JobSink = extra["jobs"]
    await jobs.push(
        "welcome_email",
        {"user_id": extra["user_id"], "username": extra["username"], "email": extra["email"]},
    )


async def enqueue_marketing_signup(sender: Any, **extra: Any) -> None:
    """Queue the address's addition to the marketing list."""
    jobs: JobSink = extra["jobs"]
    await jobs.push(
        "marketing_signup",
        {"user_id": extra["user_id"], "email": extra["email"], "signed_up_at": extra["created_at"]},
    )


async def enqueue_profile_generation(sender: Any, **extra: Any) -> None:
    """Queue the generation of the user's profile."""
    jobs: JobSink = extra["jobs"]
    await jobs.push(
        "generate_profile",
        {
            "user_id": extra["user_id"],
            "username": extra["username"],
            "email": extra["email"],
            "created_at": extra["created_at"],
        },
    )


RECEIVERS = (enqueue_welcome_email, enqueue_marketing_signup, enqueue_profile_generation)


def connect_receivers(signal: Signal) -> None:
    """Connect every receiver to ``signal``, once (connecting twice is a no-op in blinker).

    They are module-level functions, so blinker's weak references to them stay alive.
    """
    for receiver in RECEIVERS:
        signal.connect(receiver)
