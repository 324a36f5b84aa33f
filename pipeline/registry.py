"""Reactions, and the registry that collects them.

A reaction is one module (or a package whose ``__init__`` declares it) that both processes
import. It declares, in one :class:`Reaction` named ``REACTION``: the receivers it connects to
signals, the job types they push (each with its queue, attempts, timeout, handler and the
stats counter its handler keeps), the settings that are its own, and the hooks that open and
close the resources its handlers need. Nothing else in the project lists job
types, queues or counters: both processes read them from the :class:`Registry` built from the
modules that the ``REACTIONS`` setting names (by default every module of the ``reactions``
package).

A wrong declaration fails when the registry is built, with one line naming it; the web
refuses a receiver no reaction declares (:meth:`Registry.check_receivers`) and the consumers
a served queue with a type nobody handles (:meth:`Registry.check_handlers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import pkgutil
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

from blinker import NamedSignal

from pipeline.config import declared
from pipeline.context import Context
from pipeline.errors import ReactionError, UnknownJobTypeError
from pipeline.jobs import Job
from pipeline.keys import CORE_COUNTERS, NAME_RE, Keys
from pipeline.settings import DEFAULT_REACTIONS, declared_settings

Handler = Callable[[Context, Job], Awaitable[None]]
Receiver = Callable[..., Awaitable[None]]
Hook = Callable[[Context], Awaitable[None]]

#: The attribute a reaction module declares its reaction in.
ATTRIBUTE: Final = "REACTION"
#: A job type's default attempts and timeout (seconds), when its declaration gives none.
DEFAULT_ATTEMPTS: Final = 5
DEFAULT_TIMEOUT: Final = 30.0
_REACTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")


@dataclass(frozen=True, slots=True, eq=False)
class JobType:
    """One kind of job: its name (in the envelope), the queue it travels on, how many attempts
    it gets and how long each may run, the handler that does it (None: something outside this
    project consumes its queue) and the stats counter of its jobs done (the consumer adds one
    when it acknowledges a job)."""

    name: str
    queue: str
    handler: Handler | None
    attempts: int = DEFAULT_ATTEMPTS
    timeout: float = DEFAULT_TIMEOUT
    counter: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        for what, value in (("job type", self.name), ("queue", self.queue)):
            if not NAME_RE.fullmatch(value):
                raise ReactionError(f"{what} {value!r}: expected 1 to 64 of a-z, 0-9 and _")
        if self.counter is not None and not NAME_RE.fullmatch(self.counter):
            raise ReactionError(f"job type {self.name!r}: counter {self.counter!r} is not a name")
        if not 1 <= self.attempts <= 100:
            raise ReactionError(f"job type {self.name!r}: attempts must be from 1 to 100")
        if not 0.01 <= self.timeout <= 86_400:
            raise ReactionError(f"job type {self.name!r}: timeout must be 0.01 to 86400 s")

    def __str__(self) -> str:
        return self.name


#: The fields every user has in ``GET /users/<id>``; a reaction's user field takes another name.
USER_FIELDS: Final = ("user_id", "username", "email", "created_at")


@dataclass(frozen=True, slots=True, eq=False)
class UserField:
    """Something a reaction keeps per user, served with the user by ``GET /users/<id>``
    under ``name`` (null until written): its JSON is at :meth:`key`, and ``schema`` (a
    ``msgspec.Struct``) documents it in the OpenAPI document."""

    name: str
    schema: type
    description: str = ""

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name) or self.name in USER_FIELDS:
            raise ReactionError(f"user field {self.name!r}: not a name, or a user's own field")

    def key(self, keys: Keys, user_id: str) -> str:
        """The key of one user's value: ``<prefix>:<name>:<user id>``."""
        return keys.of(self.name, user_id)


@dataclass(frozen=True, slots=True, eq=False)
class Reaction:
    """What one reaction module declares: its receivers by signal, the job types it declares
    (and may push), the job types it pushes that other reactions declare, and the hooks
    opening and closing its handlers' resources (consumers only; ``shutdown`` runs even when
    a later reaction's ``startup`` failed, for the resources that were opened)."""

    name: str
    job_types: Sequence[JobType] = ()
    receivers: Mapping[NamedSignal, Sequence[Receiver]] = field(default_factory=dict)
    also_pushes: Sequence[JobType | str] = ()
    startup: Hook | None = None
    shutdown: Hook | None = None
    description: str = ""
    #: What it keeps per user and ``GET /users/<id>`` serves (see :class:`UserField`).
    user_fields: Sequence[UserField] = ()
    #: Its own settings: a frozen dataclass whose fields are ``pipeline.config.setting``
    #: declarations, read from the environment at start-up and given to its handlers by
    #: ``ctx.settings_of(...)``.
    settings: type | None = None

    def __post_init__(self) -> None:
        if not _REACTION_NAME.fullmatch(self.name):
            raise ReactionError(f"reaction {self.name!r}: not a name")
        if self.settings is not None and not (
            dataclasses.is_dataclass(self.settings) and declared(self.settings)
        ):
            raise ReactionError(
                f"reaction {self.name!r}: settings must be a dataclass of "
                "pipeline.config.setting declarations"
            )

    @property
    def pushes(self) -> tuple[str, ...]:
        """The names of the job types this reaction's receivers may push."""
        return tuple(dict.fromkeys([*map(str, self.job_types), *map(str, self.also_pushes)]))


class Registry:
    """The reactions of one process, and what follows from them: job types by name, queues,
    counters and handlers. Build with :func:`load_registry` (or :meth:`of` in tests)."""

    def __init__(self, reactions: Sequence[Reaction]) -> None:
        self.reactions: tuple[Reaction, ...] = tuple(reactions)
        job_types: dict[str, JobType] = {}
        owner: dict[str, str] = {}
        counters: dict[str, str] = dict.fromkeys(CORE_COUNTERS, "the pipeline")
        names: set[str] = set()
        receivers: dict[Receiver, Reaction] = {}
        variables = dict.fromkeys((s.env for s in declared_settings().values()), "the pipeline")
        user_fields: dict[str, UserField] = {}
        for reaction in self.reactions:
            if reaction.name in names:
                raise ReactionError(f"reaction {reaction.name!r} is declared twice")
            names.add(reaction.name)
            for own in declared(reaction.settings).values() if reaction.settings else ():
                if own.env in variables:
                    raise ReactionError(
                        f"setting {own.env} of reaction {reaction.name!r} is already declared "
                        f"by {variables[own.env]}"
                    )
                variables[own.env] = f"reaction {reaction.name!r}"
            for user_field in reaction.user_fields:
                if user_field.name in user_fields:
                    raise ReactionError(f"user field {user_field.name!r} is declared twice")
                user_fields[user_field.name] = user_field
            for job_type in reaction.job_types:
                if job_type.name in job_types:
                    raise ReactionError(
                        f"job type {job_type.name!r} is declared by both "
                        f"{owner[job_type.name]!r} and {reaction.name!r}"
                    )
                job_types[job_type.name] = job_type
                owner[job_type.name] = reaction.name
                if job_type.counter is not None:
                    if job_type.counter in counters:
                        raise ReactionError(
                            f"counter {job_type.counter!r} of job type {job_type.name!r} is "
                            f"already kept by {counters[job_type.counter]}"
                        )
                    counters[job_type.counter] = f"job type {job_type.name!r}"
            for receiver in (r for group in reaction.receivers.values() for r in group):
                if receiver in receivers:
                    raise ReactionError(
                        f"receiver {_name(receiver)} is declared by both "
                        f"{receivers[receiver].name!r} and {reaction.name!r}"
                    )
                receivers[receiver] = reaction
        #: Job types by name, ordered by queue then name (whatever order modules load in).
        self.job_types: Mapping[str, JobType] = {
            t.name: t for t in sorted(job_types.values(), key=lambda t: (t.queue, t.name))
        }
        self._owner = owner
        self._receivers = receivers
        #: Every queue a job type travels on, by name.
        self.queues: tuple[str, ...] = tuple(sorted({t.queue for t in job_types.values()}))
        #: Counters of the stats hash: the pipeline's own and one per counting job type.
        reaction_counters = [t.counter for t in self.job_types.values() if t.counter is not None]
        first, *rest = CORE_COUNTERS
        self.counters: tuple[str, ...] = (first, *reaction_counters, *rest)
        #: The counters of the reactions' job types (what a drained signup adds to).
        self.effect_counters: tuple[str, ...] = tuple(reaction_counters)
        #: Job type name -> the queue it travels on (the hot path of every push).
        self.routes: Mapping[str, str] = {name: t.queue for name, t in self.job_types.items()}
        #: What the reactions keep per user, served with it (see :class:`UserField`).
        self.user_fields: tuple[UserField, ...] = tuple(user_fields.values())
        #: The reactions' own groups of settings (see :attr:`Reaction.settings`).
        self.settings: tuple[type, ...] = tuple(
            r.settings for r in self.reactions if r.settings is not None
        )

    @classmethod
    def of(cls, *reactions: Reaction) -> Registry:
        """A registry of these reactions (for tests and tools; processes use the setting)."""
        return cls(reactions)

    def queue_for(self, name: str | JobType) -> str:
        """The queue job type ``name`` travels on; :class:`UnknownJobTypeError` if undeclared."""
        try:
            return self.routes[str(name)]
        except KeyError:
            raise UnknownJobTypeError(f"no reaction declares job type {str(name)!r}") from None

    def types_on(self, queue: str) -> tuple[JobType, ...]:
        """The job types that travel on ``queue``."""
        return tuple(t for t in self.job_types.values() if t.queue == queue)

    def handlers(self) -> dict[str, Handler]:
        """Job type name -> handler, for every type that has one."""
        return {n: t.handler for n, t in self.job_types.items() if t.handler is not None}

    def receivers(self, signal: NamedSignal) -> tuple[Receiver, ...]:
        """The receivers the reactions declare for ``signal``."""
        return tuple(r for reaction in self.reactions for r in reaction.receivers.get(signal, ()))

    # --- start-up checks ------------------------------------------------------------------

    def connect(self, sender: Any) -> None:
        """Connect every declared receiver to its signal, for ``sender`` only (each app gets
        the receivers of its own registry). Receivers are module-level functions, so
        blinker's weak references to them stay alive."""
        for reaction in self.reactions:
            for signal, receivers in reaction.receivers.items():
                for receiver in receivers:
                    signal.connect(receiver, sender=sender)

    def check_receivers(self, sender: Any) -> None:
        """Raise :class:`ReactionError` if a receiver connected to one of the reactions'
        signals for ``sender`` is declared by no reaction, or may push a job type no reaction
        declares: such a receiver's jobs would be refused in every request."""
        signals = {s for r in self.reactions for s in r.receivers}
        for signal in sorted(signals, key=lambda s: s.name):
            for receiver in signal.receivers_for(sender):
                reaction = self._receivers.get(receiver)
                if reaction is None:
                    raise ReactionError(
                        f"receiver {_name(receiver)} of {signal.name!r} is declared by no "
                        "reaction (declare it, with the job types it pushes, in a module "
                        "REACTIONS names)"
                    )
                for name in reaction.pushes:
                    if name not in self.job_types:
                        raise ReactionError(
                            f"receiver {_name(receiver)} of {signal.name!r} may push job type "
                            f"{name!r}, which no reaction in REACTIONS declares"
                        )

    def check_handlers(self, queues: Iterable[str], handlers: Mapping[str, Handler]) -> None:
        """Raise :class:`ReactionError` if one of ``queues`` carries a job type that
        ``handlers`` does not handle (its jobs would all be dead-lettered), or no job type."""
        for queue in queues:
            routed = self.types_on(queue)
            if not routed:
                raise ReactionError(f"queue {queue!r} carries no job type of any reaction")
            for job_type in routed:
                if job_type.name not in handlers:
                    raise ReactionError(
                        f"queue {queue!r} carries job type {job_type.name!r} "
                        f"(of {self._owner[job_type.name]!r}), which has no handler here"
                    )

    # --- resources ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def resources(self, ctx: Context) -> AsyncIterator[Context]:
        """Run the reactions' start-up hooks on ``ctx``, yield it, then their shutdown hooks
        in reverse order (those whose start-up ran), even on an error."""
        async with contextlib.AsyncExitStack() as stack:
            for reaction in self.reactions:
                if reaction.startup is not None:
                    await reaction.startup(ctx)
                if reaction.shutdown is not None:
                    stack.push_async_callback(reaction.shutdown, ctx)
            yield ctx


def _name(receiver: Any) -> str:
    module = getattr(receiver, "__module__", None)
    name = getattr(receiver, "__qualname__", repr(receiver))
    return f"{module}.{name}" if module else name


def _modules(name: str) -> list[ModuleType]:
    """Module ``name``, or every public module of package ``name`` (sorted by name); a
    package that declares a reaction itself is one reaction, not a package of them."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise ReactionError(f"cannot import reaction module {name!r}: {exc}") from exc
    path = getattr(module, "__path__", None)
    if path is None or hasattr(module, ATTRIBUTE):
        return [module]
    found = []
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if not info.name.startswith("_"):
            found.extend(_modules(f"{name}.{info.name}"))
    return found


@functools.cache
def load_registry(names: tuple[str, ...] = DEFAULT_REACTIONS) -> Registry:
    """The registry of the reaction modules (or packages of them) ``names``: each module
    declares ``REACTION``. Raises :class:`ReactionError` (one line) on a missing module, a
    module without a reaction, or a conflicting declaration."""
    reactions: list[Reaction] = []
    seen: set[str] = set()
    for name in names:
        for module in _modules(name):
            if module.__name__ in seen:
                continue
            seen.add(module.__name__)
            reaction = getattr(module, ATTRIBUTE, None)
            if not isinstance(reaction, Reaction):
                raise ReactionError(
                    f"module {module.__name__!r} declares no {ATTRIBUTE} (a pipeline.registry"
                    ".Reaction)"
                )
            reactions.append(reaction)
    if not reactions:
        raise ReactionError(f"{', '.join(names)}: no reaction declared")
    return Registry(reactions)
