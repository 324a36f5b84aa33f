"""The job envelope: versioned JSON, one per job, unique by id.

``{"v": 1, "id": <32 random hex digits>, "type": <a declared job type>, "attempt": 0,
"enqueued_at": <epoch s>, "payload": {...}}``, plus ``"request_id"`` when the job was queued
while handling a request, and with tracing on (``pipeline.tracing``) ``"traceparent"``, the
W3C trace context (versioned itself: ``00-<trace id>-<span id>-<flags>``) of the signup that
queued it, and on a retry ``"first_attempt"``, that of its first attempt's span. Each of these
is optional: jobs without them still run, and a value that is not a version-00 traceparent is
ignored. Job ids are unique, so the encoded bytes of two jobs never compare equal.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import orjson

from pipeline import logs, tracing
from pipeline.errors import JobDecodeError

ENVELOPE_VERSION: Final = 1


@dataclass(slots=True)
class Job:
    """One decoded job. A value: nothing changes a job once made (``dataclasses.replace``
    makes another). Not a frozen dataclass only because a frozen one's ``__init__`` costs
    three times as much (1.2 us against 0.4), and a signup makes three."""

    id: str
    type: str
    payload: dict[str, Any]
    enqueued_at: float
    attempt: int = 0
    #: The id of the request that queued the job, for joining log lines up.
    request_id: str | None = None
    #: The W3C traceparent of the span that queued the job (tracing on), and of the span of
    #: its first attempt (on a retry).
    traceparent: str | None = None
    first_attempt: str | None = None

    def encode(self) -> bytes:
        """The bytes that travel on the queue."""
        envelope = {
            "v": ENVELOPE_VERSION,
            "id": self.id,
            "type": self.type,
            "attempt": self.attempt,
            "enqueued_at": self.enqueued_at,
            "payload": self.payload,
        }
        if self.request_id is not None:
            envelope["request_id"] = self.request_id
        if self.traceparent is not None:
            envelope["traceparent"] = self.traceparent
        if self.first_attempt is not None:
            envelope["first_attempt"] = self.first_attempt
        return orjson.dumps(envelope)


class _RandomBytes(threading.local):
    """The operating system's random bytes (``os.urandom``), read 4 KiB at a time per
    thread, and forgotten by a forked child, which reads its own."""

    def __init__(self) -> None:
        self.pool = b""
        self.at = 0


_ID_BYTES: Final = 16
_POOL_BYTES: Final = 4096
_random = _RandomBytes()


def _forget_random_bytes() -> None:
    global _random
    _random = _RandomBytes()


os.register_at_fork(after_in_child=_forget_random_bytes)


def new_id() -> str:
    """A fresh random id: 32 hexadecimal digits (128 bits from ``os.urandom``). Job ids,
    user ids and request ids are these. A signup makes five: one ``os.urandom`` call each
    (a system call, 0.65 us with its hex) cost three times what slicing a buffer of them
    does. Each thread has its own buffer, and a forked child never reuses its parent's."""
    local = _random
    at = local.at
    if at == 0:
        local.pool = os.urandom(_POOL_BYTES)
    end = at + _ID_BYTES
    local.at = 0 if end == _POOL_BYTES else end
    return local.pool[at:end].hex()


_ID: Final = re.compile(r"[0-9a-f]{32}")


def is_id(value: str) -> bool:
    """Whether ``value`` is an id as :func:`new_id` makes them (safe in a Redis key)."""
    return _ID.fullmatch(value) is not None


def new_job(job_type: str, payload: dict[str, Any]) -> Job:
    """A fresh job with a new id, stamped with the current time, the request id and the
    trace context (when there are)."""
    return Job(
        id=new_id(),
        type=job_type,
        payload=payload,
        enqueued_at=time.time(),
        request_id=logs.request_id.get(),
        traceparent=None if tracing.tracer is None else tracing.current_traceparent(),
    )


def _traceparent(value: Any) -> str | None:
    """An envelope's trace context if it is a version-00 traceparent; anything else is
    ignored (a trace is an aid: it never keeps a job from running)."""
    if isinstance(value, str) and tracing.TRACEPARENT_RE.fullmatch(value):
        return value
    return None


def decode(raw: bytes) -> Job:
    """Decode queue bytes into a :class:`Job`, or raise :class:`JobDecodeError` saying why."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise JobDecodeError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise JobDecodeError("the envelope is not a JSON object")
    if data.get("v") != ENVELOPE_VERSION:
        raise JobDecodeError(f"unsupported envelope version {data.get('v')!r}")
    job_id, job_type, payload = data.get("id"), data.get("type"), data.get("payload")
    attempt, enqueued_at = data.get("attempt", 0), data.get("enqueued_at")
    if not isinstance(job_id, str) or not job_id:
        raise JobDecodeError("the envelope has no id")
    if not isinstance(job_type, str) or not job_type:
        raise JobDecodeError("the envelope has no type")
    if not isinstance(payload, dict):
        raise JobDecodeError("the payload is not a JSON object")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        raise JobDecodeError("the attempt is not a whole number")
    if not isinstance(enqueued_at, int | float) or isinstance(enqueued_at, bool):
        raise JobDecodeError("the envelope has no enqueued_at time")
    request_id = data.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise JobDecodeError("the request_id is not a string")
    return Job(
        id=job_id,
        type=job_type,
        payload=payload,
        enqueued_at=float(enqueued_at),
        attempt=attempt,
        request_id=request_id,
        traceparent=_traceparent(data.get("traceparent")),
        first_attempt=_traceparent(data.get("first_attempt")),
    )
