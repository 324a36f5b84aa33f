"""What handlers share: the done-marker script, and payload fields checked before use.

Every handler is idempotent: a job delivered twice (recovered from a consumer that died, or
retried after a failure) takes effect once. An effect in Redis that can say itself whether it
is done (an address already on a list, a profile already written) checks that in its own
script, counting only when it wrote. One that cannot, or one outside Redis (an email), keeps a
done-marker per job: :func:`once` wraps the effect in a script that sets it.
"""

from __future__ import annotations

from pipeline.errors import InvalidJobError
from pipeline.jobs import Job, is_id


def once(effect: str) -> str:
    """A script doing ``effect`` only if job KEYS[1]'s done-marker was not set yet, and setting
    it (expiring after ARGV[1] s) in the same step. Returns 1 if it ran, 0 if already done.
    The effect's own keys and arguments start at KEYS[2] and ARGV[2]."""
    return (
        "if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end\n"
        f"{effect}\nreturn 1"
    )


def count(counter: str, key: str) -> str:
    """The Lua line adding one to ``counter`` of the stats hash at ``key`` (``KEYS[n]``)."""
    return f"redis.call('HINCRBY', {key}, '{counter}', 1)"


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
