"""What a handler gets with each job: the :class:`Context`, and the typed
:class:`Resource` keys reactions keep their clients under."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pipeline.batching import AutoPipeline, ScriptBatcher
from pipeline.keys import Keys

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from pipeline.settings import Settings

T = TypeVar("T")

#: The id of the job the current task runs, set by the consumer for its handler.
_running: ContextVar[str | None] = ContextVar("running_job", default=None)


class Resource(Generic[T]):
    """A typed key of :class:`Context`: ``EMAIL = Resource[EmailBackend]("email")``, set by a
    start-up hook (``ctx[EMAIL] = ...``) and read by handlers (``ctx[EMAIL].send(...)``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Resource({self.name!r})"


class Context:
    """What handlers get with each job (arq's and SAQ's ``ctx``): Redis, the key names, the
    settings (the shared ones, and each reaction's own: :meth:`settings_of`), the resources
    the reactions' start-up hooks opened, and the calls that send their effects and reads.

    :meth:`write`, :meth:`effect` and :meth:`read` share one auto-pipeline: the effects and
    reads of the jobs finishing in the same loop tick, whatever their commands or scripts, go
    to Redis in one round trip. With ``REDIS_MIN_REPLICAS`` that round trip ends with ``WAIT``,
    so an effect a failover could still lose raises :class:`NotReplicatedError` and its job is
    put back rather than acknowledged."""

    def __init__(
        self,
        redis: aioredis.Redis,
        settings: Settings,
        reaction_settings: Mapping[type, Any] = MappingProxyType({}),
    ) -> None:
        self.redis = redis
        self.settings = settings
        self._reaction_settings = reaction_settings
        self.keys = Keys(settings.key_prefix)
        #: How long a job's done-marker lives (``IDEMPOTENCY_TTL``), in seconds.
        self.done_ttl = settings.idempotency_ttl
        self._resources: dict[Resource[Any], Any] = {}
        #: The round trips the effects and reads share (and the consumer's takes).
        self.pipeline = AutoPipeline(
            redis, settings.redis_min_replicas, settings.redis_replica_timeout
        )
        #: Jobs whose handlers set their own done-marker, which is written with the job's
        #: settlement; None: each marker is written at once (a context outside a consumer).
        self._marked: set[str] | None = None

    def settle_marks(self) -> None:
        """Make a running job's own :meth:`mark_done` part of its settlement (the consumer
        calls this): the consumer hands it to the script that acknowledges the job, or retries,
        dead-letters or returns it, rather than writing it in a round trip of its own. An
        acknowledgement that removes the job writes no marker, since nothing can deliver that
        job again; every other settlement writes it.

        Not with ``REDIS_MIN_REPLICAS``: an acknowledgement is not confirmed by replicas (one
        a failover loses only runs the job again), but a marker must be, or the failover
        that loses it repeats the effect. There each mark stays a write of its own, confirmed
        before the handler goes on: after a manual failover with ``REDIS_MIN_REPLICAS=2``,
        marks with the acknowledgement repeated 40 and 69 emails in two runs of
        ``tests/test_failover.py``, confirmed marks 16."""
        if not self.settings.redis_min_replicas:
            self._marked = set()

    def running(self, job_id: str) -> None:
        """Note that the current task runs ``job_id`` (the consumer calls this for each job,
        in the job's own task)."""
        _running.set(job_id)

    def take_mark(self, job_id: str) -> str:
        """The done-marker key ``job_id``'s handler set, to write with its settlement, or ''
        if it set none. Each mark is taken once."""
        if self._marked is None or job_id not in self._marked:
            return ""
        self._marked.discard(job_id)
        return self.keys.done(job_id)

    def settings_of(self, group: type[T]) -> T:
        """The settings a reaction declares as ``group`` (its ``Reaction.settings``), read
        from the environment at start-up."""
        try:
            value: T = self._reaction_settings[group]
        except KeyError:
            raise LookupError(
                f"no {group.__name__} settings: no reaction in REACTIONS declares them"
            ) from None
        return value

    def __getitem__(self, resource: Resource[T]) -> T:
        try:
            value: T = self._resources[resource]
        except KeyError:
            raise LookupError(
                f"no {resource.name!r} resource: its start-up hook has not run"
            ) from None
        return value

    def __setitem__(self, resource: Resource[T], value: T) -> None:
        self._resources[resource] = value

    def pop(self, resource: Resource[T]) -> T | None:
        """Remove ``resource`` (in a shutdown hook) and return it, or None if never set."""
        value: T | None = self._resources.pop(resource, None)
        return value

    def write(self, *command: Any) -> asyncio.Future[Any]:
        """A write command (``"ZADD", key, "NX", score, member``), sent with this tick's
        effects; its raw reply. Confirmed by replicas with ``REDIS_MIN_REPLICAS``."""
        return self.pipeline.queue(command, None, writes=True)

    def effect(self, source: str) -> ScriptBatcher:
        """The batched caller of the Lua script ``source`` (one per script and context), for
        an effect no single command makes."""
        return self.pipeline.script(source)

    def is_done(self, job_id: str) -> asyncio.Future[Any]:
        """Whether the done-marker of ``job_id`` is set (a :meth:`read`, answering 1 or 0):
        for an effect that cannot say itself whether it is done, such as an email."""
        if self._marked is not None and job_id in self._marked:
            return _answered(1)  # marked here, its settlement not yet written
        return self.read("EXISTS", self.keys.done(job_id))

    def mark_done(self, job_id: str) -> asyncio.Future[Any]:
        """Set the done-marker of ``job_id``, expiring after ``done_ttl``.

        In a consumer (without ``REDIS_MIN_REPLICAS``: see :meth:`settle_marks`), a job's
        handler marking its own job is done at once (the future is answered), and the mark
        goes with the job's settlement, in one script, whether or not the handler then fails.
        A retry, dead letter or return writes the marker, whether or not the job is still this
        consumer's (the effect it marks happened). An acknowledgement writes it only when the
        job is no longer this consumer's (recovered from it after its lease lapsed): for the
        delivery that holds the job now. One that finds its job removes it, which ends the
        job's deliveries, so the marker would never be read, and is not kept (no key a job
        for ``done_ttl``). Marker and acknowledgement are kept or lost together: a job whose
        acknowledgement a failover loses runs again, as one whose marker never reached a
        replica would. Any other mark (another job's, with ``REDIS_MIN_REPLICAS``, or outside
        a consumer) is a :meth:`write`, confirmed by replicas when they must confirm."""
        if self._marked is not None and _running.get() == job_id:
            self._marked.add(job_id)
            return _answered(True)
        return self.write("SET", self.keys.done(job_id), "1", "NX", "EX", self.done_ttl)

    def read(self, *command: Any) -> asyncio.Future[Any]:
        """A read-only command (``"EXISTS", key``), sent with this tick's effects; its raw
        reply. Not confirmed by replicas (it writes nothing)."""
        return self.pipeline.read(*command)


def _answered(value: Any) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
