"""``python -m loadtest.noop_consumer``: the real consumer (runner, broker, settings, signals)
with handlers that do nothing, so a drain measures the queue machinery alone."""

from __future__ import annotations

import asyncio
import sys

from consumers.cli import loop_factory, run
from consumers.handlers import HandlerContext
from pipeline.jobs import Job
from pipeline.keys import JOB_QUEUES
from pipeline.logs import configure_logging
from pipeline.settings import Settings


async def noop(ctx: HandlerContext, job: Job) -> None:
    """Does nothing."""


def main() -> int:
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(run(settings, dict.fromkeys(JOB_QUEUES, noop)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
