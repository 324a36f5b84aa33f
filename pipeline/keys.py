"""Every Redis key and queue name, in one place, under the configured prefix.

Keys never contain raw user input: user ids are generated hex, and the uniqueness claims are
fields of two hashes, not keys of their own.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

#: What a queue, a job type or a counter may be called (they become parts of key names).
NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")

#: Counters of the stats hash that the pipeline itself keeps, and what each counts; each
#: reaction's job types add their own (see ``pipeline.registry``). ``users`` comes first in
#: ``/stats``, the reactions' counters next, then the rest.
USERS: Final = "users"
RECEIVER_ERRORS: Final = "receiver_errors"
DEAD_LETTERS_DROPPED: Final = "dead_letters_dropped"
CORE_COUNTERS: Final = {
    USERS: "Users signed up.",
    RECEIVER_ERRORS: "Receivers that raised during a signup (the signup still succeeded).",
    DEAD_LETTERS_DROPPED: "The oldest dead letters dropped past DEAD_LETTER_MAX.",
}


class Keys:
    """The key names for one prefix. Build once per process and pass it around."""

    __slots__ = (
        "_queues",
        "consumers",
        "dead",
        "dead_by_queue",
        "deliveries",
        "email_claims",
        "prefix",
        "stats",
        "username_claims",
    )

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        # queue name -> its list's key, built once (every push looks one up).
        self._queues: dict[str, str] = {}
        #: list of dead letters, newest first.
        self.dead = f"{prefix}:dead"
        #: hash of queue name -> its dead letters on that list, kept by the scripts that add
        #: and remove them (entries pushed by hand, or before 1.x, are not in it).
        self.dead_by_queue = f"{prefix}:dead-by-queue"
        #: sorted set of consumer ids, scored by their last heartbeat (Redis time).
        self.consumers = f"{prefix}:consumers"
        #: hash of job id -> times the job was recovered from a consumer that died holding it.
        self.deliveries = f"{prefix}:deliveries"
        #: hash of normalised username -> user id.
        self.username_claims = f"{prefix}:claims:username"
        #: hash of normalised email -> user id.
        self.email_claims = f"{prefix}:claims:email"
        #: hash of counters (see CORE_COUNTERS and the reactions' counters).
        self.stats = f"{prefix}:stats"

    def queue(self, name: str) -> str:
        """The list of queue ``name``'s jobs (LPUSH in, popped from the right)."""
        try:
            return self._queues[name]
        except KeyError:
            key = self._queues[name] = f"{self.prefix}:queue:{name}"
            return key

    def of(self, *parts: str) -> str:
        """A key a reaction keeps for itself: ``of("marketing")`` is ``<prefix>:marketing``.
        Parts are the reaction's own constants or generated ids, never user input."""
        return ":".join((self.prefix, *parts))

    def delayed(self, queue: str) -> str:
        """The sorted set of ``queue``'s jobs waiting to be retried, scored by when due."""
        return f"{self.prefix}:delayed:{queue}"

    def processing(self, queue: str, consumer_id: str) -> str:
        """The list of ``queue``'s jobs that consumer ``consumer_id`` holds (at-least-once)."""
        return f"{self.processing_prefix(queue)}{consumer_id}"

    def processing_prefix(self, queue: str) -> str:
        """What every consumer's processing list of ``queue`` starts with (a script appends
        the consumer's id)."""
        return f"{self.prefix}:processing:{queue}:"

    def lease(self, consumer_id: str) -> str:
        """The liveness lease of consumer ``consumer_id``: a key that expires unless renewed."""
        return f"{self.lease_prefix}{consumer_id}"

    @property
    def lease_prefix(self) -> str:
        """What every lease's key starts with (a script appends the consumer's id)."""
        return f"{self.prefix}:lease:"

    @property
    def history_prefix(self) -> str:
        """What every history bucket's key starts with (a script appends the bucket's start,
        in Unix seconds): a hash of jobs ``done`` and ``failed`` in it, and ``users`` as
        counted when it began."""
        return f"{self.prefix}:history:"

    def rate(self, client: str) -> str:
        """The rate limit's state for one client address (as ``service.clients`` writes it,
        never raw header text): when its next signup is due, in Redis milliseconds."""
        return f"{self.prefix}:rate:{client}"

    def done(self, job_id: str) -> str:
        """The marker saying job ``job_id``'s effect has happened."""
        return f"{self.prefix}:done:{job_id}"

    def latency(self, queue: str) -> str:
        """The list of ``queue``'s recent ``"wait_ms run_ms"`` samples, newest first."""
        return f"{self.prefix}:latency:{queue}"

    def user(self, user_id: str) -> str:
        """The hash holding one user's record."""
        return f"{self.prefix}:user:{user_id}"

    def idempotency(self, key: str) -> str:
        """The record of the signup made with ``Idempotency-Key: key`` (its SHA-256, so the
        client's text is never part of a key name)."""
        return f"{self.prefix}:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"
