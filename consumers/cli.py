"""The consumer command line.

``python -m consumers [--queues email,profile] [--concurrency 8|email=8,profile=2]
[--grace-period S] [--delivery at-least-once|at-most-once] [--metrics-port P]`` runs the
consumers (and, with a metrics port, serves ``GET /metrics`` on it). Flags
override the matching environment variables. SIGTERM or SIGINT stops gracefully; a second one
stops at once. Exit 0 after a graceful stop.

``python -m consumers dead list [--limit N] [--json]``, ``dead requeue (--all | JOB_ID)``,
``dead delete JOB_ID``, ``dead purge`` and ``stats [--json]`` operate the pipeline; ``check``
exits 0 only when at least one consumer holds a live lease (a container health check).

Exit 2 on bad arguments or settings, 1 when Redis cannot be reached, a job id is not found or
``check`` finds no live consumer:
one line on stderr either way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import redis.asyncio as aioredis

from consumers.admin import operate
from consumers.metrics import ConsumerMetrics, serve_metrics
from consumers.runner import Consumer
from pipeline import tracing
from pipeline.config import redact_url
from pipeline.connections import consumer_client
from pipeline.context import Context
from pipeline.errors import ReactionError, SettingsError
from pipeline.heap import freeze_heap
from pipeline.keys import Keys
from pipeline.logs import configure_logging
from pipeline.plan import Plan, resolve
from pipeline.queue import Broker
from pipeline.registry import Handler
from pipeline.settings import (
    Settings,
    declared_settings,
    parse_concurrency,
    parse_delivery_mode,
    parse_grace_period,
    parse_port,
    parse_queues,
)
from pipeline.version import __version__

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


def _help(field: str, text: str) -> str:
    """A flag's help: ``text``, then the setting it overrides and its default, from the
    setting's one declaration."""
    declared = declared_settings()[field]
    return f"{text} (env {declared.env}; default {declared.default or 'unset'})"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Run the signup pipeline's consumers.")
    parser.add_argument("--version", action="version", version=f"signup-pipeline {__version__}")
    parser.add_argument(
        "--queues",
        type=_flag(parse_queues),
        help=_help("consumer_queues", "comma-separated queues to consume"),
    )
    parser.add_argument(
        "--concurrency",
        type=_flag(parse_concurrency),
        help=_help("consumer_concurrency", "jobs run at once per queue: N, or QUEUE=N,..."),
    )
    parser.add_argument(
        "--grace-period",
        type=_flag(parse_grace_period),
        help=_help("shutdown_grace_period", "seconds in-flight jobs get on shutdown"),
    )
    parser.add_argument(
        "--delivery",
        type=_flag(parse_delivery_mode),
        help=_help("delivery_mode", "at-least-once or at-most-once"),
    )
    parser.add_argument(
        "--metrics-port",
        type=_flag(parse_port),
        help=_help("metrics_port", "serve Prometheus metrics on this port at /metrics"),
    )
    commands = parser.add_subparsers(dest="command", metavar="{dead,stats,check,dashboard}")
    dead = commands.add_parser("dead", help="list, requeue, delete or purge dead letters")
    dead_commands = dead.add_subparsers(dest="dead_command", metavar="{list,requeue,delete,purge}")
    dead_commands.required = True
    listing = dead_commands.add_parser("list", help="show dead letters, newest first")
    listing.add_argument(
        "--limit", type=_flag(_positive), default=None, help="show at most N (default all)"
    )
    listing.add_argument(
        "--json", action="store_true", help="print them as one JSON array ([] for none)"
    )
    requeue = dead_commands.add_parser("requeue", help="put dead jobs back on their queue")
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("job_id", nargs="?", help="the id of the job to requeue")
    which.add_argument("--all", action="store_true", help="requeue every dead letter")
    delete = dead_commands.add_parser("delete", help="delete one job's dead letter")
    delete.add_argument("job_id", help="the id of the job whose dead letter to delete")
    dead_commands.add_parser("purge", help="delete every dead letter")
    stats = commands.add_parser(
        "stats", help="queue depths, jobs held, retries waiting, dead letters, live consumers"
    )
    stats.add_argument("--json", action="store_true", help="print the stats as one JSON object")
    commands.add_parser(
        "check", help="exit 0 only when at least one consumer holds a live lease (health check)"
    )
    commands.add_parser(
        "dashboard",
        help="serve the operator's dashboard on DASHBOARD_BIND:DASHBOARD_PORT "
        "(default 127.0.0.1:9181)",
    )
    return parser


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def main(argv: list[str], environ: dict[str, str] | None = None) -> int:
    """Run the consumers; return the process's exit code."""
    parser = _parser()
    options = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        name: value
        for name, value in (
            ("consumer_queues", options.queues),
            ("consumer_concurrency", options.concurrency),
            ("shutdown_grace_period", options.grace_period),
            ("delivery_mode", options.delivery),
            ("metrics_port", options.metrics_port),
        )
        if value is not None
    }
    if options.command and overrides:
        parser.error(f"the run options apply to running consumers, not to {options.command!r}")
    try:
        settings = dataclasses.replace(Settings.from_env(environ), **overrides)
        plan = resolve(settings)
    except SettingsError as exc:
        flags = {s.env: s.flag for name, s in declared_settings().items() if name in overrides}
        if exc.variable in flags:
            # A value the flags gave (a queue no reaction declares): say it of the flag.
            parser.error(f"argument {flags[exc.variable]}: {exc.value!r}: {exc.problem}")
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if options.command == "dashboard":
        from dashboard.server import serve_dashboard  # Quart: only this command needs it

        configure_logging(settings.log_level, settings.log_format)
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(serve_dashboard(plan))
    if options.command is not None:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(operate(plan, options))
    configure_logging(settings.log_level, settings.log_format)
    tracing.configure("signup-consumers")
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(run(plan))
    finally:
        tracing.shutdown()  # the spans still batched go out
    return 0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def consumer_parts(redis: aioredis.Redis, plan: Plan) -> tuple[Context, Broker]:
    """A consumer's handler context and its broker, on ``redis``: the broker's takes share
    the context's auto-pipeline with the handlers' effects and reads, so a tick's takes and
    effects cost one round trip."""
    settings = plan.settings
    ctx = Context(redis, settings, plan.reaction_settings)
    broker = Broker(
        redis,
        Keys(settings.key_prefix),
        mode=settings.delivery_mode,
        dead_letter_max=settings.dead_letter_max,
        queues=plan.registry.queues,
        pipeline=ctx.pipeline,
        done_ttl=settings.idempotency_ttl,
    )
    return ctx, broker


async def run(plan: Plan, handlers: Mapping[str, Handler] | None = None) -> None:
    """Consume the configured queues until SIGTERM or SIGINT, then drain and close Redis.

    Handlers are the registry's (``REACTIONS``) unless given. A served queue carrying a job
    type without a handler stops start-up (exit 2, one line), before anything is fetched;
    the reactions' start-up hooks open their resources, and their shutdown hooks close them
    once the drain is over."""
    settings, registry = plan.settings, plan.registry
    handlers = registry.handlers() if handlers is None else handlers
    try:
        registry.check_handlers(plan.queues, handlers)
    except ReactionError as exc:
        print(f"{PROG}: error: REACTIONS: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
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

    concurrency = plan.concurrency
    # One connection per fetch loop and per running job, one each for the heartbeat, the
    # sweeper and the maintainer, and one spare.
    redis = consumer_client(
        settings, max_connections=len(concurrency) + sum(concurrency.values()) + 4
    )
    ctx, broker = consumer_parts(redis, plan)
    metrics = ConsumerMetrics(registry)
    server = None
    if settings.metrics_port is not None:
        try:
            server = await serve_metrics(metrics, settings.metrics_port)
        except OSError as exc:
            await redis.aclose()
            raise SystemExit(
                f"{PROG}: error: cannot serve metrics on port {settings.metrics_port}: "
                f"{exc.strerror or exc}"
            ) from None
    logger.info(
        "consumer %s: consuming %s from %s (prefix %r), %s",
        broker.consumer_id,
        ", ".join(f"{q}x{n}" for q, n in concurrency.items()),
        redact_url(settings.redis_url),
        settings.key_prefix,
        settings.delivery_mode,
    )
    try:
        async with registry.resources(ctx):
            freeze_heap()  # everything the process keeps is loaded and opened by now
            await Consumer(broker, handlers, ctx, plan, metrics).run(stop, force)
    finally:
        if server is not None:
            server.close()
            await server.wait_closed()
        await redis.aclose()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    logger.info("stopped")
