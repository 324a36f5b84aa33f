"""What handlers share: payload fields checked before use.

Every handler is idempotent: a job delivered twice (recovered from a consumer that died, or
retried after a failure) takes effect once. An effect in Redis that can say itself whether it
is done makes it with a command that does nothing the second time (``ZADD NX``, ``SET NX``:
:meth:`Context.write`). One that cannot, or one outside Redis (an email), keeps a done-marker
per job: checked first (:meth:`Context.is_done`), set once the effect is made
(:meth:`Context.mark_done`). Counting is not the handler's: the consumer adds one to the job
type's counter when it acknowledges the job, which happens once per job.
"""

from __future__ import annotations

from pipeline.errors import InvalidJobError
from pipeline.jobs import Job, is_id


def payload_text(job: Job, name: str, max_length: int = 254) -> str:
    """A text field of the job's payload, checked before it goes into an email header, a log
    line or a Redis key: present, printable (no CR, LF or other control or format
    character) and bounded. A job failing this can never succeed: :class:`InvalidJobError`
    dead-letters it at once. (The web validates the same values; this guards against jobs put
    on the queues by anything else.)"""
    value = job.payload.get(name)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise InvalidJobError(f"payload field {name!r} is missing, not text or too long")
    if not value.isprintable():
        raise InvalidJobError(f"payload field {name!r} holds a control or format character")
    return value


def payload_user_id(job: Job) -> str:
    """The payload's ``user_id``: 32 hexadecimal digits, as the web makes them (it is part of
    a Redis key)."""
    value = payload_text(job, "user_id", 32)
    if not is_id(value):
        raise InvalidJobError("payload field 'user_id' is not 32 hexadecimal digits")
    return value
