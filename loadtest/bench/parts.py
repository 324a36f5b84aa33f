"""``python -m loadtest.bench.parts``: what each part of a signup costs the web worker.

The app is driven in-process through ASGI (no HTTP server, no network but Redis), 32 signups
at a time, and its CPU time per request measured at five levels, each adding one part:

  bare     a bare Quart app answering a constant 201 (the framework's own cost)
  app      this app with the signup view replaced by that constant answer: the middleware
           (request id, access line, metrics) and the app's routing
  body     + reading the request body
  valid    + parsing and validating it
  signup   the real view: + the signal, its receivers' jobs, the commit in Redis, the 201

Every level runs under the collector settings the checkout's served app has (its heap frozen
at start, here), so that each difference is the part's own. Each level runs in its own
process pinned to one core (the last), in alternating rounds;
the report gives the median per level and the difference each part makes. ``--root`` points
at another checkout of the project to measure its code (say, before a change) the same way.
It needs a Redis: ``--redis-url``, else a scratch server is started on the other cores.
With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, the levels run with tracing on, as served.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[2]
LEVELS = ("bare", "app", "body", "valid", "signup")
BODY = b'{"user_id":"0","username":"bare","email":"bare@example.com"}'


def _build(level: str, redis_url: str) -> Any:
    """The ASGI app of ``level`` (imported from whichever checkout is first on sys.path)."""
    if level == "bare":
        from loadtest.bench.bare import app

        return app
    from quart import Response, request

    import pipeline.settings
    from pipeline.settings import Settings
    from service.app import create_app
    from service.deps import deps
    from service.validation import parse_body, validate_signup

    settings = Settings.from_env({"REDIS_URL": redis_url, "RATE_LIMIT": "1000000/1"})
    # A checkout from before the plan (an A/B against an older commit) has no pipeline/plan.py.
    # Asked by file, not by import: the development install's finder would import this
    # checkout's plan into the older package.
    if not Path(pipeline.settings.__file__).with_name("plan.py").exists():
        app = create_app(settings)  # type: ignore[arg-type]
    else:
        from pipeline.plan import resolve

        app = create_app(resolve(settings))

    async def read() -> bytes:
        return cast(bytes, await request.get_data(cache=False, as_text=False))

    async def constant() -> Response:
        if level in ("body", "valid"):
            body = await read()
            if level == "valid":
                parsed = parse_body(request.mimetype, request.mimetype_params.get("charset"), body)
                validate_signup(parsed, deps().reserved)
        return Response(BODY, status=201, content_type="application/json")

    if level != "signup":
        app.view_functions["api.signup"] = constant
    return app


async def _measure(app: Any, requests: int, rounds: int) -> list[float]:
    counter = 0

    async def one() -> int:
        nonlocal counter
        counter += 1
        name = f"p{os.getpid()}_{counter}"
        body = f'{{"username":"{name}","email":"{name}@example.com"}}'.encode()
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/signup", "raw_path": b"/signup",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000), "extensions": {},
            "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
        }  # fmt: skip
        delivered = False
        status: list[int] = []

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # no disconnect: the request ends by itself
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        return status[0]

    await app.startup()
    try:  # every level under the served app's collector settings, where the checkout has them
        from pipeline.heap import freeze_heap
    except ImportError:
        pass
    else:
        freeze_heap()
    try:
        for _ in range(50):  # warm-up
            await asyncio.gather(*(one() for _ in range(32)))
        figures = []
        for _ in range(rounds):
            started = time.process_time()
            answers: list[int] = []
            for _ in range(requests // 32):
                answers += await asyncio.gather(*(one() for _ in range(32)))
            figures.append((time.process_time() - started) / len(answers) * 1e6)
            if set(answers) != {201}:
                raise RuntimeError(f"answers other than 201: {set(answers)}")
        return figures
    finally:
        await app.shutdown()


def _child(level: str, redis_url: str, requests: int) -> None:
    """Run in the measured process: print the median CPU per request of a few rounds."""
    import logging

    import uvloop

    from pipeline.logs import configure_logging

    configure_logging("INFO")  # the access line on, as served, written to /dev/null
    handler = cast(logging.StreamHandler[Any], logging.getLogger().handlers[0])
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115
    try:  # as service:app does: tracing on with OTEL_EXPORTER_OTLP_ENDPOINT set
        from pipeline import tracing
    except ImportError:  # a checkout from before tracing
        tracing = None  # type: ignore[assignment]
    if tracing is not None:
        tracing.configure("signup-web")
    app = _build(level, redis_url)
    figures = uvloop.run(_measure(app, requests, rounds=3))
    if tracing is not None:
        tracing.shutdown()  # its export counted: the CPU is the process's, threads included
    print(f"PARTS {statistics.median(figures):.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.parts", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--requests", type=int, default=6400, help="signups per measure")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure")
    parser.add_argument("--redis-url", help="a Redis to use (default: a scratch server)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        _child(options.child, options.redis_url, options.requests)
        return 0
    from devtools.embedded_redis import scratch_server

    cores = sorted(os.sched_getaffinity(0))
    server_core, others = {cores[-1]}, set(cores[:-1]) or {cores[-1]}
    with scratch_server(cores=others) as redis_url:
        url = options.redis_url or redis_url
        results: dict[str, list[float]] = {level: [] for level in LEVELS}
        env = {**os.environ, "PYTHONPATH": str(options.root.resolve())}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each process keeps its metrics to itself
        for index in range(options.rounds):
            for level in LEVELS if index % 2 == 0 else LEVELS[::-1]:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", level,
                     "--redis-url", url, "--requests", str(options.requests)],
                    cwd=options.root, env=env, capture_output=True, text=True, check=True,
                    preexec_fn=lambda: os.sched_setaffinity(0, server_core),
                )  # fmt: skip
                figure = float(done.stdout.split("PARTS ")[-1])
                results[level].append(figure)
                print(f"round {index + 1}  {level:<7} {figure:7.1f} us", flush=True)
    medians = {level: statistics.median(values) for level, values in results.items()}
    print(f"\n{options.root}: CPU per signup, median of {options.rounds} rounds")
    previous = None
    for level in LEVELS:
        added = "" if previous is None else f"  +{medians[level] - medians[previous]:.1f}"
        print(f"  {level:<7} {medians[level]:7.1f} us{added}")
        previous = level
    print(f"  own     {medians['signup'] - medians['bare']:7.1f} us above the bare app")
    return 0


if __name__ == "__main__":
    sys.exit(main())
