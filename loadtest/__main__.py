"""``python -m loadtest``: load-test ``POST /signup``.

    python -m loadtest [--url http://127.0.0.1:8000] (--concurrency N | --rate R)
                       [--connections N] [--duration S] [--warmup S]
                       [--json report.json] [--chart report.png]
                       [--drain-timeout S] [--no-pipeline]

Every request signs up a new user, over keep-alive connections. Closed loop (``--concurrency``,
default 64): that many connections, each sending as soon as its last answer came. Open loop
(``--rate``): requests scheduled at R per second over ``--connections`` connections, latency
measured from each request's scheduled time (no coordinated omission). A live line shows the
last second (the warmup's labelled so); the final report, of the measured phase only, gives the
rate achieved (answers over the time they took; for an open loop next to the rate offered, and
whether the server fell behind), latency percentiles, status codes, errors, and the pipeline's
view: how long after the load every accepted signup's jobs were processed, the end-to-end rate,
and this run's queue waits (from ``GET /stats``, when they can be told apart).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from loadtest.client import HttpError, parse_url
from loadtest.generator import LoadRun, Plan
from loadtest.report import pipeline_view, read_stats, render, summarise, write_chart, write_json
from pipeline.errors import SettingsError
from pipeline.plan import resolve
from pipeline.settings import Settings

PROG = "python -m loadtest"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _number(
    kind: Callable[[str], float], minimum: float, *, inclusive: bool
) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` above ``minimum`` (or equal, if ``inclusive``)."""
    wanted = f"{minimum:g} or more" if inclusive else f"more than {minimum:g}"

    def parse(raw: str) -> float:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r}: expected a number") from None
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"{raw!r}: expected {wanted}")
        return value

    return parse


_positive_int = _number(int, 0, inclusive=False)
_positive = _number(float, 0, inclusive=False)
_non_negative = _number(float, 0, inclusive=True)


def _url(raw: str) -> tuple[str, int]:
    try:
        return parse_url(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{raw!r}: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Load-test POST /signup.")
    parser.add_argument(
        "--url", type=_url, default=("127.0.0.1", 8000), help="the service (http://127.0.0.1:8000)"
    )
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument(
        "--concurrency",
        type=_positive_int,
        help="closed loop: connections, each one request at a time (default 64)",
    )
    loop.add_argument("--rate", type=_positive, help="open loop: requests per second")
    parser.add_argument(
        "--connections",
        type=_positive_int,
        default=64,
        help="open loop: connections to send on (64)",
    )
    parser.add_argument("--duration", type=_positive, default=10.0, help="measured seconds (10)")
    parser.add_argument(
        "--warmup", type=_non_negative, default=2.0, help="seconds of load before measuring (2)"
    )
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--chart", type=Path, help="write a PNG chart here (needs matplotlib)")
    parser.add_argument(
        "--drain-timeout",
        type=_positive,
        default=60.0,
        help="seconds to wait for the pipeline to process every accepted signup (60)",
    )
    parser.add_argument(
        "--no-pipeline", action="store_true", help="skip the pipeline view (no consumers running)"
    )
    parser.add_argument("--quiet", action="store_true", help="no live progress line")
    return parser


async def _main(options: argparse.Namespace) -> int:
    host, port = options.url
    try:
        before = await read_stats(host, port)
    except HttpError as exc:
        print(
            f"{PROG}: error: cannot reach the service at http://{host}:{port}: {exc}",
            file=sys.stderr,
        )
        return 1
    plan = Plan(
        host=host,
        port=port,
        duration=options.duration,
        warmup=options.warmup,
        connections=options.concurrency or options.connections,
        rate=options.rate,
        progress=not options.quiet,
    )
    recording = await LoadRun(plan).run()
    summary = summarise(recording, options.rate)
    if not options.no_pipeline:
        summary["pipeline"] = await pipeline_view(
            host,
            port,
            before,
            recording.accepted_total,
            options.warmup + options.duration,
            options.drain_timeout,
            summary["backlog"],
            options.duration,
            options.registry,
        )
    print(render(summary))
    if options.json:
        write_json(summary, options.json)
    if options.chart:
        write_chart(summary, options.chart)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(argv)
    # Which counters' jobs travel on which queue: the service's REACTIONS, read as it does.
    try:
        options.registry = resolve(Settings.from_env()).registry
    except SettingsError as exc:
        parser.error(str(exc))
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_main(options))


if __name__ == "__main__":
    sys.exit(main())
