"""Resolving: settings plus the ``REACTIONS`` modules, turned once into what a process runs
with.

:func:`resolve` is the one step between reading the environment and starting a process: it
loads the reactions ``REACTIONS`` names into a registry, reads each reaction's own settings,
and fills the per-queue and per-type values (served queues, concurrency, attempts, timeouts)
from the declarations and the overrides given, checking every name. The :class:`Plan` it
returns is handed explicitly to the app factory (``create_app(plan)``), the consumer runner
(``run(plan)``), the CLI's commands and the Procfile's check (``python -m pipeline.plan``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from pipeline import config
from pipeline.errors import ReactionError, SettingsError
from pipeline.registry import Registry, load_registry
from pipeline.settings import DEFAULT_CONCURRENCY, EVERY, Settings

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Plan:
    """What one process runs with: its settings, its reactions, and what follows from both."""

    settings: Settings
    #: The reactions of ``REACTIONS``: job types, queues, counters, handlers.
    registry: Registry
    #: The queues a consumer process serves (``CONSUMER_QUEUES``, else every queue), each
    #: with the jobs it runs at once (``CONSUMER_CONCURRENCY``, else the default).
    concurrency: Mapping[str, int]
    #: Per job type: attempts before dead-lettering (``JOB_MAX_ATTEMPTS``, else declared).
    attempts: Mapping[str, int]
    #: Per job type: seconds a run may take (``JOB_TIMEOUT``, else declared).
    timeouts: Mapping[str, float]
    #: Each reaction's own settings, by their class (see ``Reaction.settings``).
    reaction_settings: Mapping[type, Any]

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues a consumer process serves."""
        return tuple(self.concurrency)

    def settings_of(self, group: type[T]) -> T:
        """The settings a reaction declares as ``group``."""
        value: T = self.reaction_settings[group]
        return value


def resolve(settings: Settings, registry: Registry | None = None) -> Plan:
    """The plan of ``settings``: the registry of ``REACTIONS`` (``registry`` instead, when
    given: tests and tools), the reactions' own settings read from the environment the
    settings came from, and the per-queue and per-type values filled in. A name no reaction
    declares, or a bad value of a reaction's setting, raises :class:`SettingsError` naming
    the variable; a broken reaction raises it for ``REACTIONS``."""
    if registry is None:
        try:
            registry = load_registry(settings.reactions)
        except ReactionError as exc:
            raise SettingsError("REACTIONS", ",".join(settings.reactions), str(exc)) from None
    queues = settings.consumer_queues or registry.queues
    if not set(queues) <= set(registry.queues):
        raise SettingsError(
            "CONSUMER_QUEUES",
            ",".join(queues),
            f"expected a comma-separated list of {', '.join(registry.queues)}",
        )
    concurrency = _fill(
        "CONSUMER_CONCURRENCY",
        settings.consumer_concurrency,
        dict.fromkeys(registry.queues, DEFAULT_CONCURRENCY),
    )
    types = registry.job_types.values()
    return Plan(
        settings=settings,
        registry=registry,
        concurrency=MappingProxyType({q: concurrency[q] for q in queues}),
        attempts=_fill(
            "JOB_MAX_ATTEMPTS", settings.job_max_attempts, {t.name: t.attempts for t in types}
        ),
        timeouts=_fill("JOB_TIMEOUT", settings.job_timeout, {t.name: t.timeout for t in types}),
        reaction_settings=MappingProxyType(
            {group: config.read(group, settings.environ) for group in registry.settings}
        ),
    )


def _fill(setting: str, given: Mapping[str, T], defaults: Mapping[str, T]) -> Mapping[str, T]:
    """``defaults`` overridden by ``given`` (per name, or :data:`EVERY` for all); a name
    ``defaults`` does not have is a :class:`SettingsError` naming ``setting``."""
    unknown = [name for name in given if name != EVERY and name not in defaults]
    if unknown:
        shown = ",".join(str(v) if k == EVERY else f"{k}={v}" for k, v in given.items())
        raise SettingsError(setting, shown, f"{unknown[0]!r} is not one of {', '.join(defaults)}")
    every = given.get(EVERY)
    return MappingProxyType(
        {
            name: given.get(name, every if every is not None else default)
            for name, default in defaults.items()
        }
    )


class _Probe:
    """A sender standing in for the app while its receivers are checked."""


def main() -> int:
    """``python -m pipeline.plan``: exit 0 if the environment's settings are valid, the
    reactions of ``REACTIONS`` load with their own settings and fit together (every receiver
    declared, with job types some reaction declares); else print one line saying what is
    wrong and exit 2. The Procfile runs it before hypercorn, whose exit code hides a
    worker's failed start (pgjones/hypercorn#269)."""
    try:
        registry = resolve(Settings.from_env()).registry
        probe = _Probe()
        registry.connect(probe)
        registry.check_receivers(probe)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ReactionError as exc:
        print(f"error: REACTIONS: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
