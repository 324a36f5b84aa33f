"""The signals, declared once, and the helper that emits them with failures isolated.

They live here, not in ``service``, so that reaction modules (which both processes import)
can connect to them without building the app.

blinker's ``send_async`` awaits receivers one after another and stops at the first exception.
:func:`emit` walks the same receivers in the same way, but runs every one: a receiver that
raises is logged with its traceback and counted, and the rest still run.
"""

from __future__ import annotations

import functools
import logging
from inspect import iscoroutinefunction
from typing import Any

from blinker import NamedSignal, Namespace

from pipeline.errors import UnknownJobTypeError

logger = logging.getLogger(__name__)

#: Whether a receiver is an ``async def``, asked once per receiver, not once per signal sent
#: (``inspect`` looks through wrappers and partials each time it is asked).
_is_async = functools.lru_cache(maxsize=1024)(iscoroutinefunction)

signals = Namespace()

#: Sent by ``POST /signup`` once a signup is valid, before it is committed. The app is the
#: sender. Keyword arguments: ``jobs`` (a JobSink: ``await jobs.push(type, payload)``),
#: ``user_id``, ``username``, ``email``, ``created_at`` (epoch seconds). More may be added:
#: receivers take what they need from ``**extra``.
user_signed_up = signals.signal("user-signed-up", doc="A user signed up.")


async def emit(signal: NamedSignal, sender: Any, **kwargs: Any) -> list[str]:
    """Await every async receiver of ``signal`` for ``sender``; return the names of those that
    raised (or were skipped for not being async).

    :class:`UnknownJobTypeError` is not isolated: a receiver pushing a job type no reaction
    declares is a bug in the wiring, and the signal's sender fails loudly rather than
    answering as if the job had been queued."""
    failures: list[str] = []
    for receiver in signal.receivers_for(sender):
        if not _is_async(receiver):
            logger.error("receiver %s of %r is not async; skipped", _name(receiver), signal.name)
            failures.append(_name(receiver))
            continue
        try:
            await receiver(sender, **kwargs)
        except UnknownJobTypeError:
            raise
        except Exception:
            failures.append(_name(receiver))
            logger.exception("receiver %s of %r raised", _name(receiver), signal.name)
    return failures


def _name(receiver: Any) -> str:
    return getattr(receiver, "__qualname__", repr(receiver))
