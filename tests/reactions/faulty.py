"""A reaction whose receivers misbehave: one raises, one is not async. Its signups must
still succeed, with the other reactions' jobs queued."""

from __future__ import annotations

from typing import Any, Final

from pipeline.registry import Reaction
from pipeline.signals import user_signed_up


async def broken_receiver(sender: Any, **extra: Any) -> None:
    raise RuntimeError("receiver exploded")


def sync_receiver(sender: Any, **extra: Any) -> None:
    pass


REACTION: Final = Reaction(
    "faulty",
    receivers={user_signed_up: [broken_receiver, sync_receiver]},  # type: ignore[list-item]
)
