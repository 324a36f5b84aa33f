"""The consumer command line.

``python -m consumers [--queues email,profile] [--concurrency 8|email=8,profile=2]
[--grace-period S]``. Flags override the matching environment variables. SIGTERM or SIGINT
stops gracefully; a second one stops at once. Exit 0 after a graceful stop, 2 on bad
arguments or settings (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from consumers.email import email_backend
from consumers.handlers import HANDLERS, HandlerContext
from consumers.runner import Consumer
from pipeline.connections import consumer_client
from pipeline.errors import SettingsError
from pipeline.keys import Keys
from pipeline.logs import configure_logging
from pipeline.settings import (
    Settings,
    parse_concurrency,
    parse_grace_period,
    parse_queues,
    redact_url,
)

logger = logging.getLogger("consumers")
PROG = "python -m consumers"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block.
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _flag(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(raw: str) -> Any:
        try:
            return parse(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{raw!r}: {exc}") from None

    return convert


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Run the signup pipeline's consumers.")
    parser.add_argument(
        "--queues",
        type=_flag(parse_queues),
        help="comma-separated queues to consume (env CONSUMER_QUEUES; default all)",
    )
    parser.add_argument(
        "--concurrency",
        type=_flag(parse_concurrency),
        help="jobs run at once per queue: N, or QUEUE=N,... (env CONSUMER_CONCURRENCY; default 4)",
    )
    parser.add_argument(
        "--grace-period",
        type=_flag(parse_grace_period),
        help="seconds in-flight jobs get on shutdown (env SHUTDOWN_GRACE_PERIOD; default 10)",
    )
    return parser


def main(argv: list[str], environ: dict[str, str] | None = None) -> int:
    """Run the consumers; return the process's exit code."""
    options = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(environ)
    except SettingsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {}
    if options.queues is not None:
        overrides["consumer_queues"] = options.queues
    if options.concurrency is not None:
        overrides["consumer_concurrency"] = options.concurrency
    if options.grace_period is not None:
        overrides["shutdown_grace_period"] = options.grace_period
    settings = dataclasses.replace(settings, **overrides)
    configure_logging(settings.log_level)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(run(settings))
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def run(settings: Settings) -> None:
    """Consume the configured queues until SIGTERM or SIGINT, then drain and close Redis."""
    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if stop.is_set():
            logger.warning("%s again: stopping now", name)
            force.set()
        else:
            logger.info(
                "%s: stopping; in-flight jobs get %.1f s (send it again to stop now)",
                name,
                settings.shutdown_grace_period,
            )
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum.name)

    concurrency = {q: settings.consumer_concurrency[q] for q in settings.consumer_queues}
    # One connection per fetch loop and per running job, and one spare.
    redis = consumer_client(
        settings, max_connections=len(concurrency) + sum(concurrency.values()) + 1
    )
    keys = Keys(settings.key_prefix)
    context = HandlerContext(redis, keys, email_backend(settings), settings.email_from)
    consumer = Consumer(
        redis,
        keys,
        HANDLERS,
        context,
        concurrency=concurrency,
        fetch_timeout=settings.fetch_timeout,
        grace_period=settings.shutdown_grace_period,
    )
    logger.info(
        "consuming %s from %s (prefix %r)",
        ", ".join(f"{q}x{n}" for q, n in concurrency.items()),
        redact_url(settings.redis_url),
        settings.key_prefix,
    )
    try:
        await consumer.run(stop, force)
    finally:
        await redis.aclose()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    logger.info("stopped")
