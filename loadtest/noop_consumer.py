"""``python -m loadtest.noop_consumer``: the real consumer (runner, broker, settings, signals)
with handlers that do nothing, so a drain measures the queue machinery alone."""

from __future__ import annotations

import asyncio
import sys

from consumers.cli import loop_factory, run
from pipeline import tracing
from pipeline.context import Context
from pipeline.jobs import Job
from pipeline.logs import configure_logging
from pipeline.plan import resolve
from pipeline.settings import Settings


async def noop(ctx: Context, job: Job) -> None:
    """Does nothing."""


def main() -> int:
    settings = Settings.from_env()
    plan = resolve(settings)
    configure_logging(settings.log_level, settings.log_format)
    tracing.configure("signup-consumers")  # as python -m consumers does
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(run(plan, dict.fromkeys(plan.registry.job_types, noop)))
    finally:
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
