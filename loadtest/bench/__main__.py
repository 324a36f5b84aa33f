"""``python -m loadtest.bench`` (``make bench``): side by side in one run, alternating rounds,
medians.

Signup, with wrk (same threads, connections, duration and worker count for each):
  - ``bare``: a bare Quart app on hypercorn answering a constant 201 (the stack's ceiling);
  - ``service``: this service on hypercorn (consumers not running);
  - ``bare-uvicorn``, ``service-uvicorn``: the same two on uvicorn, the second supported
    server, as the docs' "Serving on uvicorn" runs it (and ``bare-granian``,
    ``service-granian`` with ``--servers`` once granian is installed in ``.venv``: measured,
    not supported);
  - ``flask``: the classic design on Flask + sync redis under gunicorn gthread (the peer);
  - ``replicated`` (with ``--replica``): this service with ``REDIS_MIN_REPLICAS=1``, its
    Redis then having a replica (which every server of that run writes to);
  - ``traced`` (with ``--servers``): this service with tracing on, exporting every span over
    OTLP/HTTP to a receiver that discards them (``loadtest.bench.otlp_sink``, with the load);
  - ``baseline`` (with ``--baseline PATH``): this service as another checkout has it (say
    ``git worktree add /tmp/base main``), to measure a change side by side.
Consumers, each draining the same number of no-op jobs with the same concurrency:
  - ``at-least-once`` and ``at-most-once``: this project's consumer process, and
    ``at-least-once-traced`` with tracing on (jobs carrying a signup's trace context, spans
    exported to the discarding receiver): the consumer's CPU per job is measured too;
  - ``brpop``, ``arq``, ``saq``: a hand-written BRPOP loop, arq and SAQ (benchmark-only venv).

Prints one table with ratios and RSS, and writes it (and the raw figures) to the results
files. Every server and worker is stopped by its process group when its round ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import redis

from devtools.embedded_redis import free_port, scratch_server
from loadtest.bench.dashboard import CALLS as DASHBOARD_CALLS
from loadtest.bench.dashboard import DEAD_LETTERS, bench_dashboard
from loadtest.client import Connection, HttpError
from loadtest.drain import drain_round

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
LUA = Path(__file__).with_name("signup.lua")
SERVERS = ("bare", "service", "bare-uvicorn", "service-uvicorn", "flask")
#: The other ASGI servers a run may add (``--servers``): ``bare-<server>`` and
#: ``service-<server>``, the ceiling and this service on that server.
#: granian is measured, not supported: no lock installs it (``.venv/bin/pip install granian``).
ASGI_SERVERS = ("uvicorn", "granian")
CONSUMERS = ("at-least-once", "at-most-once", "at-least-once-traced", "brpop", "arq", "saq")
PROBE = b'{"username": "bench_probe", "email": "bench_probe@example.com"}'


def _argv(server: str, port: int, workers: int, bench_python: str) -> list[str]:
    bind = f"127.0.0.1:{port}"
    if server == "flask":
        return [
            bench_python, "-m", "gunicorn", "loadtest.bench.flask_peer:app",
            "--worker-class", "gthread", "--workers", str(workers), "--threads", "8",
            "--bind", bind, "--log-level", "warning",
        ]  # fmt: skip
    app_name, _, asgi = server.partition("-")
    app = "loadtest.bench.bare:app" if app_name == "bare" else "service:app"  # or replicated
    host, port_text = bind.split(":")
    if asgi == "uvicorn":  # as the docs' "Serving on uvicorn" runs it
        from service.uvicorn_options import UVICORN_OPTIONS

        return [
            sys.executable, "-m", "uvicorn", *UVICORN_OPTIONS, "--host", host,
            "--port", port_text, "--workers", str(workers), "--log-level", "warning", app,
        ]  # fmt: skip
    if asgi == "granian":
        return [
            sys.executable, "-m", "granian", "--interface", "asgi", "--host", host,
            "--port", port_text, "--workers", str(workers), "--loop", "uvloop",
            "--http", "1", "--log-level", "warning", app,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "hypercorn", app, "--worker-class", "uvloop",
        "--workers", str(workers), "--bind", bind,
    ]  # fmt: skip


def _in_turn(items: Sequence[T], index: int) -> list[T]:
    """``items`` starting at round ``index``'s turn: each round begins one further on, so
    every item is measured first, last and between in turn."""
    start = index % len(items)
    return [*items[start:], *items[:start]]


def ceiling_of(server: str) -> str:
    """The bare app on the same ASGI server as ``server``."""
    _, _, asgi = server.partition("-")
    return f"bare-{asgi}" if asgi else "bare"


def all_servers() -> tuple[str, ...]:
    """Every signup server ``--servers`` accepts."""
    others = [f"{app}-{asgi}" for asgi in ASGI_SERVERS for app in ("bare", "service")]
    return tuple(dict.fromkeys([*SERVERS, "replicated", "traced", "baseline", *others]))


@dataclass(frozen=True)
class Cores:
    """Where each part runs: the server alone on ``server``, the load generator (and Redis)
    on ``load``. None: the machine has one core, and everything shares it."""

    server: set[int] | None
    load: set[int] | None

    @classmethod
    def of_this_machine(cls) -> Cores:
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 2:
            return cls(None, None)
        return cls({available[-1]}, set(available[:-1]))

    @property
    def pinned(self) -> bool:
        return self.server is not None

    def describe(self) -> str:
        if self.server is None or self.load is None:
            return "one core: server, wrk and Redis share it (nothing pinned)"
        return (
            f"server pinned alone on core {_cores(self.server)}; wrk and Redis on core "
            f"{_cores(self.load)}"
        )


def _cores(cores: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def _pinned_to(cores: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child (and so everything it starts) to ``cores``."""
    if cores is None:
        return None
    return lambda: os.sched_setaffinity(0, cores)


def _tree_cpu(process: subprocess.Popen[bytes]) -> float:
    """CPU seconds (user + system) used so far by ``process`` and all its children."""
    total = 0.0
    try:
        family = [psutil.Process(process.pid)]
        family += family[0].children(recursive=True)
    except psutil.Error:
        return float("nan")
    for member in family:
        try:
            times = member.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _reads(client: redis.Redis) -> int:
    """Read events Redis has processed (``total_reads_processed``): about one per round
    trip a client makes, since a pipeline arrives in one read."""
    return int(client.info("stats")["total_reads_processed"])


def _flush(client: redis.Redis) -> None:
    """Empty Redis synchronously: Valkey 8 and later free a plain FLUSHALL's data in a
    background thread (``lazyfree-lazy-user-flush yes``), whose CPU would be counted in the
    next round's Redis CPU."""
    client.execute_command("FLUSHALL", "SYNC")  # type: ignore[no-untyped-call]


def redis_cpu(client: redis.Redis) -> float:
    """CPU seconds (user + system) the Redis server has used since it started."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@contextmanager
def _server(
    argv: list[str],
    env: dict[str, str],
    port: int,
    cores: set[int] | None = None,
    cwd: Path = ROOT,
) -> Iterator[subprocess.Popen[bytes]]:
    """A :func:`_server_process` answering POST /signup on ``port``. Its output, access log
    included, is written and discarded."""
    with _server_process(argv, env, cores, cwd) as process:
        asyncio.run(_until_answering(port, process))
        yield process


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's group, then SIGKILL it if it has not gone within 15 s."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            process.wait(15)
            break
        except subprocess.TimeoutExpired:
            continue


async def _until_answering(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        connection = Connection("127.0.0.1", port, timeout=2)
        try:
            status, _ = await connection.request("POST", "/signup", PROBE)
            if status in (201, 409):
                return
        except HttpError:
            pass
        finally:
            connection.close()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{process.args!r} did not answer within 30 s")


@contextmanager
def _replica(primary_url: str, wanted: bool) -> Iterator[None]:
    """With ``wanted``, a replica of the server at ``primary_url`` for the run, linked."""
    if not wanted:
        yield
        return
    port = str(redis.Redis.from_url(primary_url).connection_pool.connection_kwargs["port"])
    with scratch_server("--replicaof", "127.0.0.1", port) as replica_url:
        replica = redis.Redis.from_url(replica_url)
        deadline = time.monotonic() + 30
        while replica.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not link within 30 s")
            time.sleep(0.1)
        replica.close()
        yield


def _worker_rss(process: subprocess.Popen[bytes]) -> float:
    """The largest RSS (MB) among the server's worker processes (the master's children, or
    the server itself when it has none)."""
    try:
        server = psutil.Process(process.pid)
        # One worker may be the server process itself (uvicorn with --workers 1).
        workers = server.children(recursive=True) or [server]
        return float(max(worker.memory_info().rss for worker in workers)) / 2**20
    except (psutil.Error, ValueError):
        return float("nan")


def _wrk(
    url: str, connections: int, threads: int, seconds: float, cores: set[int] | None = None
) -> dict[str, Any]:
    result = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        env={**os.environ, "BENCH_RUN": str(time.time_ns() % 10**10)},
        check=True,
        preexec_fn=_pinned_to(cores),
    )
    found = re.search(r"^BENCH (\{.*\})$", result.stdout, re.MULTILINE)
    if not found:
        raise RuntimeError(f"wrk printed no figures:\n{result.stdout}\n{result.stderr}")
    figures: dict[str, Any] = json.loads(found.group(1))
    seconds_run = figures["duration_us"] / 1e6
    errors = sum(figures[k] for k in ("non_2xx", "connect", "read", "write", "timeout"))
    return {
        "requests": figures["requests"],
        "rps": figures["requests"] / seconds_run,
        "p50_ms": figures["p50_us"] / 1e3,
        "p99_ms": figures["p99_us"] / 1e3,
        "errors": errors,
    }


def bench_signup(
    options: argparse.Namespace, redis_url: str, client: redis.Redis, cores: Cores
) -> dict[str, list[dict[str, Any]]]:
    servers = options.servers or ((*SERVERS, "replicated") if options.replica else SERVERS)
    if options.baseline and "baseline" not in servers:
        servers = (*servers, "baseline")
    results: dict[str, list[dict[str, Any]]] = {server: [] for server in servers}
    # As deployed: the access log on, at INFO (written to a discarded stream); tracing off.
    env = {**os.environ, "REDIS_URL": redis_url, "LOG_LEVEL": "INFO", "ACCESS_LOG": "true"}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env["PYTHONPATH"] = str(ROOT)
    # wrk sends every signup from 127.0.0.1: a limit that is checked, and never reached.
    env["RATE_LIMIT"] = "1000000/1"
    sink = _otlp_sink(cores.load) if "traced" in servers else contextlib.nullcontext("")
    with sink as otlp:
        own_envs = {
            "replicated": {**env, "REDIS_MIN_REPLICAS": "1"},
            "traced": {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp},
            "baseline": {**env, "PYTHONPATH": str(options.baseline)},
        }
        for index in range(options.rounds):
            for server in _in_turn(servers, index):
                figures = _signup_round(
                    options, server, own_envs.get(server, env), client, cores, index
                )
                results[server].append(figures)
    _flush(client)
    return results


def _signup_round(
    options: argparse.Namespace,
    server: str,
    env: dict[str, str],
    client: redis.Redis,
    cores: Cores,
    index: int,
) -> dict[str, Any]:
    """One round of ``server``: warm-up, then wrk, with the server's and Redis's CPU."""
    port = free_port()
    _flush(client)
    cwd = Path(options.baseline) if server == "baseline" else ROOT
    argv = _argv(server, port, options.workers, options.bench_python)
    with _server(argv, env, port, cores.server, cwd) as process:
        url = f"http://127.0.0.1:{port}/signup"
        load = (options.connections, options.threads)
        if options.warmup:
            _wrk(url, *load, options.warmup, cores.load)
        server_cpu, redis_before = _tree_cpu(process), redis_cpu(client)
        figures = _wrk(url, *load, options.duration, cores.load)
        served = max(1, figures["requests"])
        figures["cpu_us"] = (_tree_cpu(process) - server_cpu) / served * 1e6
        figures["redis_us"] = (redis_cpu(client) - redis_before) / served * 1e6
        figures["rss_mb"] = _worker_rss(process)
    print(
        f"round {index + 1}  {server:<10} {figures['rps']:>8,.0f} req/s  "
        f"p50 {figures['p50_ms']:6.2f} ms  p99 {figures['p99_ms']:6.2f} ms  "
        f"CPU {figures['cpu_us']:5.0f} us/req  Redis {figures['redis_us']:5.1f} us/req  "
        f"errors {figures['errors']}  worker RSS {figures['rss_mb']:.1f} MB",
        flush=True,
    )
    return figures


@contextmanager
def _otlp_sink(cores: set[int] | None) -> Iterator[str]:
    """A discarding OTLP/HTTP receiver (``loadtest.bench.otlp_sink``) pinned to ``cores``;
    yields its endpoint once it answers."""
    port = free_port()
    argv = [sys.executable, "-m", "loadtest.bench.otlp_sink", str(port)]
    with _server_process(argv, {**os.environ, "PYTHONPATH": str(ROOT)}, cores):
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the OTLP sink did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"


def bench_pipeline(
    options: argparse.Namespace, redis_url: str, client: redis.Redis, cores: Cores
) -> dict[str, list[dict[str, Any]]]:
    """Redis's CPU per signup end to end: the service (2 workers) and one consumer process
    with the real handlers (console email) on the server core, wrk on the other,
    ``INFO cpu`` and ``INFO commandstats`` from before the load until every job is done.
    With ``--baseline``, rounds of the other checkout's service and consumer alternate with
    this one's ("service" and "baseline")."""
    roots = {"service": ROOT}
    if options.baseline:
        roots["baseline"] = Path(options.baseline)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
    for index in range(options.rounds):
        for name in _in_turn(list(roots), index):
            row = _end_to_end(options, redis_url, client, cores, 2, 1, roots[name])
            results[name].append(row)
            print(
                f"round {index + 1}  pipeline {name:<9} {row['signups']:>8,} signups  Redis "
                f"{row['redis_us']:5.1f} us/signup end to end, {row['reads']:.2f} reads/signup",
                flush=True,
            )
    _flush(client)
    return results


#: The (web workers, consumer processes) the sizing model is checked against.
SIZINGS = ((1, 1), (2, 1), (1, 2), (2, 2))


def bench_sizing(
    options: argparse.Namespace, redis_url: str, client: redis.Redis, cores: Cores
) -> dict[str, list[dict[str, Any]]]:
    """The sizing model's inputs and its check: each of :data:`SIZINGS` end to end (web and
    consumers sharing the server core, wrk and Redis on the other), alternating, measuring
    the CPU per signup of the web, the consumers and Redis, and the rate at which signups
    were taken and done (from the load's start until the last job)."""
    results: dict[str, list[dict[str, Any]]] = {_sizing(*s): [] for s in SIZINGS}
    for index in range(options.rounds):
        for workers, consumers in _in_turn(SIZINGS, index):
            row = _end_to_end(options, redis_url, client, cores, workers, consumers)
            results[_sizing(workers, consumers)].append(row)
            print(
                f"round {index + 1}  sizing {workers}w/{consumers}c {row['rate']:8,.0f} "
                f"signups/s end to end  web {row['web_us']:5.0f}  consumers "
                f"{row['consumer_us']:5.0f}  Redis {row['redis_us']:5.1f} us/signup",
                flush=True,
            )
    _flush(client)
    return results


def _sizing(workers: int, consumers: int) -> str:
    return f"{workers} web, {consumers} consumer"


def _end_to_end(
    options: argparse.Namespace,
    redis_url: str,
    client: redis.Redis,
    cores: Cores,
    workers: int,
    consumers: int,
    root: Path = ROOT,
) -> dict[str, Any]:
    """One round: the service with ``workers`` workers and ``consumers`` consumer processes
    (real handlers, console email) on the server core, wrk on the other for the duration,
    then until every job is done. CPU per signup of each part, Redis's commands per signup."""
    from pipeline.keys import Keys
    from pipeline.registry import load_registry

    stats_key = Keys("signup").stats
    counters = load_registry().effect_counters
    env = {**os.environ, "REDIS_URL": redis_url, "LOG_LEVEL": "WARNING", "PYTHONPATH": str(root)}
    env["RATE_LIMIT"] = "1000000/1"
    _flush(client)
    port = free_port()
    argv = _argv("service", port, workers, options.bench_python)
    with contextlib.ExitStack() as stack:
        web = stack.enter_context(_server(argv, env, port, cores.server, root))
        consumer_processes = [
            stack.enter_context(
                _server_process([sys.executable, "-m", "consumers"], env, cores.server, root)
            )
            for _ in range(consumers)
        ]
        _flush(client)  # the probe signup of start-up
        client.config_resetstat()
        web_before = _tree_cpu(web)
        consumer_before = sum(_tree_cpu(w) for w in consumer_processes)
        before, reads_before = redis_cpu(client), _reads(client)
        started = time.monotonic()
        figures = _wrk(
            f"http://127.0.0.1:{port}/signup",
            options.connections,
            options.threads,
            options.duration,
            cores.load,
        )
        deadline = time.monotonic() + 120
        while True:
            found = client.hmget(stats_key, ["users", *counters])
            users, done = int(found[0] or 0), [int(v or 0) for v in found[1:]]
            if users and all(d >= users for d in done):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not drained in 120 s: {users} users, {done}")
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        cpu = redis_cpu(client) - before
        reads = _reads(client) - reads_before
        web_cpu = _tree_cpu(web) - web_before
        consumer_cpu = sum(_tree_cpu(w) for w in consumer_processes) - consumer_before
        commands = client.info("commandstats")
    per_command = {
        name.removeprefix("cmdstat_"): {
            "calls": value["calls"] / users,
            "us": value["usec"] / users,
        }
        for name, value in commands.items()
    }
    return {
        "signups": users,
        "rps": figures["rps"],
        "rate": users / elapsed,
        "redis_us": cpu / users * 1e6,
        "web_us": web_cpu / users * 1e6,
        "consumer_us": consumer_cpu / users * 1e6,
        "reads": reads / users,
        "commands": per_command,
    }


@contextmanager
def _server_process(
    argv: list[str], env: dict[str, str], cores: set[int] | None, cwd: Path = ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own group, pinned to ``cores``, stopped with SIGTERM (then SIGKILL)."""
    process = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_pinned_to(cores),
    )
    try:
        yield process
    finally:
        _stop_group(process)


def bench_consumers(
    options: argparse.Namespace, redis_url: str, client: redis.Redis
) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in CONSUMERS}
    with _otlp_sink(None) as otlp:  # beside the consumer, as the drain's Redis is
        for index in range(options.rounds):
            for kind in _in_turn(CONSUMERS, index):
                _flush(client)
                if kind.startswith(("at-least-once", "at-most-once")):
                    rate, rss, cpu = asyncio.run(
                        drain_round(
                            redis_url,
                            kind.removesuffix("-traced"),
                            options.jobs,
                            options.concurrency,
                            "noop",
                            otlp if kind.endswith("-traced") else None,
                        )
                    )
                    figures = {"jobs_per_s": rate, "rss_mb": rss, "cpu_us": cpu}
                else:
                    figures = _peer_drain(options, kind, redis_url)
                results[kind].append(figures)
                print(
                    f"round {index + 1}  {kind:<20} {figures['jobs_per_s']:>9,.0f} jobs/s  "
                    f"RSS {figures['rss_mb']:.1f} MB",
                    flush=True,
                )
    _flush(client)
    return results


def _peer_drain(options: argparse.Namespace, kind: str, redis_url: str) -> dict[str, Any]:
    result = subprocess.run(
        [
            options.bench_python,
            "-m",
            "loadtest.bench.peer_drain",
            kind,
            "--url",
            redis_url,
            "--jobs",
            str(options.jobs),
            "--concurrency",
            str(options.concurrency),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    found = re.search(r"^BENCH (\{.*\})$", result.stdout, re.MULTILINE)
    if not found:
        raise RuntimeError(f"{kind} printed no figures:\n{result.stdout}\n{result.stderr}")
    figures = json.loads(found.group(1))
    return {"jobs_per_s": figures["jobs"] / figures["seconds"], "rss_mb": figures["rss_mb"]}


def _sampler() -> str:
    """The sampler the traced rows ran with, if the environment names one (the SDK reads
    ``OTEL_TRACES_SAMPLER``; its default keeps every trace)."""
    sampler = os.environ.get("OTEL_TRACES_SAMPLER")
    if not sampler:
        return ""
    argument = os.environ.get("OTEL_TRACES_SAMPLER_ARG")
    return f", {sampler}" + (f" {argument}" if argument else "")


def _paired(results: dict[str, Any], before: str, after: str, unit: str) -> str:
    """CPU per ``unit`` of ``after`` against ``before``, round by round (each round's pair
    measured one after the other) and the median of those differences."""
    pairs = [
        (a["cpu_us"], b["cpu_us"]) for a, b in zip(results[before], results[after], strict=True)
    ]
    diffs = [b - a for a, b in pairs]
    ratios = [b / a for a, b in pairs]
    return (
        f"CPU per {unit}, {after} against {before}, round by round: "
        + ", ".join(f"{d:+.1f} µs ({r - 1:+.1%})" for d, r in zip(diffs, ratios, strict=True))
        + f"; median {statistics.median(diffs):+.1f} µs ({statistics.median(ratios) - 1:+.1%})."
    )


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(float(row[key]) for row in rows))


def pipeline_table(
    options: argparse.Namespace, pipeline: dict[str, list[dict[str, Any]]]
) -> list[str]:
    """Redis CPU per signup end to end, and the commands behind it; with a baseline, its
    commands beside this one's, and the two compared round by round."""
    rounds = pipeline["service"]
    baseline = pipeline.get("baseline")
    lines = [
        f"Redis per signup, end to end: this service (2 workers) and one consumer process "
        f"(real handlers, console email), wrk -t{options.threads} -c{options.connections} "
        f"-d{options.duration:g}s, `INFO cpu` and `INFO commandstats` from before the load "
        f"until every job is done; median of {len(rounds)} rounds: "
        f"**{_median(rounds, 'redis_us'):.1f} µs of Redis CPU per signup** "
        f"(rounds: {', '.join(format(r['redis_us'], '.1f') for r in rounds)}; "
        f"{_median(rounds, 'signups'):,.0f} signups a round). Redis read "
        f"{_median(rounds, 'reads'):.2f} times per signup (`total_reads_processed`: about "
        "one a round trip).",
        "",
    ]
    if baseline:
        pairs = list(zip(baseline, rounds, strict=True))
        ratios = [after["redis_us"] / before["redis_us"] for before, after in pairs]
        lines[0] += (
            f" The baseline ({options.baseline}), in alternating rounds: "
            f"**{_median(baseline, 'redis_us'):.1f} µs** (rounds: "
            f"{', '.join(format(r['redis_us'], '.1f') for r in baseline)}), read "
            f"{_median(baseline, 'reads'):.2f} times per signup; this one against it, round by "
            f"round: {', '.join(format(r - 1, '+.0%') for r in ratios)}, median "
            f"**{statistics.median(ratios) - 1:+.0%}**."
        )
    columns = [("", rounds)] + ([(" (baseline)", baseline)] if baseline else [])
    lines += [
        "| command | "
        + " | ".join(f"calls per signup{c} | µs per signup{c}" for c, _ in columns)
        + " |",
        "| --- |" + " ---: | ---: |" * len(columns),
    ]
    names = sorted({name for _, rows in columns for r in rows for name in r["commands"]})
    medians = {name: [_command(rows, name) for _, rows in columns] for name in names}
    for name, figures in sorted(medians.items(), key=lambda item: -item[1][0][1]):
        if any(calls >= 0.01 for calls, _ in figures):
            cells = " | ".join(f"{calls:.2f} | {us:.1f}" for calls, us in figures)
            lines.append(f"| {name.upper()} | {cells} |")
    lines += [
        "",
        "µs per signup are Redis's own count of each command's time. A script's commands are "
        "counted on their own lines and again in the time of the EVALSHA that ran them.",
        "",
    ]
    return lines


def _command(rows: list[dict[str, Any]], name: str) -> tuple[float, float]:
    """Median calls and µs per signup of command ``name`` over ``rows`` (0 where absent)."""
    calls = statistics.median(r["commands"].get(name, {"calls": 0})["calls"] for r in rows)
    us = statistics.median(r["commands"].get(name, {"us": 0})["us"] for r in rows)
    return float(calls), float(us)


#: How busy the model lets each part run, leaving room for bursts and failover.
SIZING_UTILISATION = 0.7


def sizing_table(
    options: argparse.Namespace, sizing: dict[str, list[dict[str, Any]]], cores: Cores
) -> list[str]:
    """The sizing model, from the 1-web 1-consumer runs, and its check against the others:
    each part's CPU per signup is taken as constant, so the server core, running every web
    worker and consumer here, should carry 1e6 / (web + consumers) signups/s end to end
    whatever the process counts."""
    base = sizing[_sizing(1, 1)]
    web, consumer = _median(base, "web_us"), _median(base, "consumer_us")
    redis_us = statistics.median(r["redis_us"] for rows in sizing.values() for r in rows)
    predicted = 1e6 / (web + consumer)
    lines = [
        f"Sizing: {cores.describe()}; every web worker and consumer process on the server "
        f"core, wrk -t{options.threads} -c{options.connections} -d{options.duration:g}s, real "
        f"handlers (console email), each round from the load's start until its last job is "
        f"done; median of {options.rounds} alternating rounds per configuration. The model's "
        f"inputs come from the 1-web 1-consumer runs: web {web:.0f} µs, consumers "
        f"{consumer:.0f} µs of CPU per signup (its three jobs), so one core running both "
        f"should carry 1e6 / {web + consumer:.0f} = **{predicted:,.0f} signups/s** end to end "
        "in every configuration; Redis (median of all runs) "
        f"**{redis_us:.0f} µs** per signup.",
        "",
        "| web workers, consumers | signups/s end to end | model | error | web µs/signup "
        "| consumers µs/signup | Redis µs/signup |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in sizing.items():
        rate = _median(rows, "rate")
        lines.append(
            f"| {name} | {rate:,.0f} | {predicted:,.0f} | {rate / predicted - 1:+.0%} "
            f"| {_median(rows, 'web_us'):.0f} | {_median(rows, 'consumer_us'):.0f} "
            f"| {_median(rows, 'redis_us'):.1f} |"
        )
    per_thousand = (web / 1000, consumer / 1000, redis_us / 1000)
    lines += [
        "",
        f"Per 1,000 signups/s: {per_thousand[0]:.2f} cores of web workers, "
        f"{per_thousand[1]:.2f} of consumer processes, {per_thousand[2]:.3f} of Redis. At "
        f"{SIZING_UTILISATION:.0%} busy, one web worker carries "
        f"{SIZING_UTILISATION * 1e6 / web:,.0f} signups/s, one consumer process "
        f"{SIZING_UTILISATION * 1e6 / consumer:,.0f}, and one Redis core "
        f"{SIZING_UTILISATION * 1e6 / redis_us:,.0f}.",
        "",
    ]
    return lines


def table(
    options: argparse.Namespace,
    signup: dict[str, Any],
    consumers: dict[str, Any],
    cores: Cores,
    pipeline: dict[str, list[dict[str, Any]]] | None = None,
    sizing: dict[str, list[dict[str, Any]]] | None = None,
    dashboard: dict[str, float] | None = None,
) -> str:
    when = time.strftime("%Y-%m-%d %H:%M")
    lines = [f"# make bench: {platform.node()}, {os.cpu_count()} CPUs, {when}", ""]
    if signup:
        peer = _median(signup["flask"], "rps") if "flask" in signup else float("nan")
        lines += [
            f"POST /signup: {cores.describe()}. wrk -t{options.threads} "
            f"-c{options.connections} -d{options.duration:g}s (after {options.warmup:g} s of "
            f"warm-up), unique signups; {options.workers} server worker(s); the access log on; "
            f"median of {options.rounds} alternating rounds. CPU: the server's process tree, "
            "and Redis's (`INFO cpu`), over the requests served. Own cost: CPU per request "
            'above the bare app on the same server; "vs ceiling" too divides by the bare app '
            "on the same server.",
            "",
            "| server | req/s | vs ceiling | vs Flask | p50 ms | p99 ms | p99 vs ceiling "
            "| CPU µs/req | own cost µs | Redis µs/req | errors | worker RSS MB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        threads = f"{options.workers}x8"
        names = {
            "bare": "bare Quart on hypercorn, constant 201 (ceiling)",
            "service": "this service on hypercorn",
            "flask": f"Flask + blinker + 2 LPUSH, gunicorn gthread {threads} (peer)",
            "replicated": "this service, REDIS_MIN_REPLICAS=1 (WAIT for the replica)",
            "traced": "this service, tracing on (OTLP/HTTP to a discarding receiver"
            + _sampler()
            + ")",
            "baseline": f"this service as {options.baseline} has it (baseline)",
        }
        for asgi in ASGI_SERVERS:
            names[f"bare-{asgi}"] = f"bare Quart on {asgi}, constant 201 (its ceiling)"
            names[f"service-{asgi}"] = f"this service on {asgi}"
        for server in signup:
            rows, bare = signup[server], signup[ceiling_of(server)]
            ceiling, ceiling_p99 = _median(bare, "rps"), _median(bare, "p99_ms")
            rps, p99 = _median(rows, "rps"), _median(rows, "p99_ms")
            cpu = _median(rows, "cpu_us")
            own = (
                "-"
                if server.startswith(("bare", "flask"))
                else f"{cpu - _median(bare, 'cpu_us'):.0f}"
            )
            lines.append(
                f"| {names[server]} | {rps:,.0f} | {rps / ceiling:.2f} "
                f"| {'-' if math.isnan(peer) else format(rps / peer, '.2f')} "
                f"| {_median(rows, 'p50_ms'):.2f} | {p99:.2f} | {p99 / ceiling_p99:.2f} "
                f"| {cpu:.0f} | {own} | {_median(rows, 'redis_us'):.1f} "
                f"| {sum(r['errors'] for r in rows)} | {_median(rows, 'rss_mb'):.1f} |"
            )
        for server in signup:
            if not server.startswith(("bare", "flask")):
                paired = [
                    row["cpu_us"] - bare["cpu_us"]
                    for row, bare in zip(signup[server], signup[ceiling_of(server)], strict=True)
                ]
                lines.append(
                    f"\nOwn cost of {names[server]}, round by round (each round's service "
                    f"less the same round's ceiling): "
                    + ", ".join(f"{value:.0f}" for value in paired)
                    + f" µs; median {statistics.median(paired):.0f} µs."
                )
        for before, after in (("baseline", "service"), ("service", "traced")):
            if before in signup and after in signup:
                lines.append("\n" + _paired(signup, before, after, "request"))
        lines.append("")
    if pipeline:
        lines += pipeline_table(options, pipeline)
    if sizing:
        lines += sizing_table(options, sizing, cores)
    if consumers:
        arq, saq = _median(consumers["arq"], "jobs_per_s"), _median(consumers["saq"], "jobs_per_s")
        lines += [
            f"Consumers: {options.jobs:,} no-op jobs, {options.concurrency} at a time, one "
            f"process, median of {options.rounds} alternating rounds",
            "",
            "| consumer | jobs/s | vs arq | vs SAQ | consumer CPU µs/job | RSS MB |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        names = {
            "at-least-once": "this project, at-least-once",
            "at-most-once": "this project, at-most-once",
            "at-least-once-traced": "this project, at-least-once, tracing on",
            "brpop": "hand-written loop, one BRPOP per job",
            "arq": "arq (poll_delay 0)",
            "saq": "SAQ",
        }
        for kind in CONSUMERS:
            rows = consumers[kind]
            rate = _median(rows, "jobs_per_s")
            per_job = f"{_median(rows, 'cpu_us'):.0f}" if "cpu_us" in rows[0] else "-"
            lines.append(
                f"| {names[kind]} | {rate:,.0f} | {rate / arq:.1f} | {rate / saq:.1f} "
                f"| {per_job} | {_median(rows, 'rss_mb'):.1f} |"
            )
        lines += ["", _paired(consumers, "at-least-once", "at-least-once-traced", "job"), ""]
    if dashboard:
        lines += [
            f"Dashboard: Redis CPU per read (`INFO cpu` over {DASHBOARD_CALLS} of each), with "
            f"1,000 latency samples per queue, every history bucket, two live consumers and "
            f"{DEAD_LETTERS:,} dead letters in Redis",
            "",
            "| read | Redis µs |",
            "| --- | ---: |",
            *(f"| {name} | {cost:.0f} |" for name, cost in dashboard.items()),
            "",
        ]
    lines.append(
        "The consumer drains share the machine's cores with Redis. Across machines, compare "
        "the ratios, not the absolute figures."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5; at least 3 for medians)")
    parser.add_argument("--duration", type=float, default=8, help="wrk seconds per round (8)")
    parser.add_argument(
        "--warmup", type=float, default=2, help="wrk warm-up seconds, not counted (2)"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument(
        "--workers", type=int, default=1, help="server workers (1: one core's worth)"
    )
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per drain (20000)")
    parser.add_argument("--concurrency", type=int, default=8, help="jobs at a time (8)")
    parser.add_argument(
        "--only",
        choices=["signup", "pipeline", "sizing", "consumers", "dashboard"],
        help="run one part of the five",
    )
    parser.add_argument(
        "--servers",
        type=lambda raw: tuple(raw.split(",")),
        help=f"signup servers to run, of {','.join(all_servers())} (default "
        f"{','.join(SERVERS)}; each one's ceiling, the bare app on its ASGI server, must be "
        "among them)",
    )
    parser.add_argument(
        "--replica",
        action="store_true",
        help="give Redis a replica, and add this service with REDIS_MIN_REPLICAS=1",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (git worktree add /tmp/base main) whose service runs beside "
        "this one, as the signup part's baseline row",
    )
    parser.add_argument(
        "--bench-python", default=str(ROOT / ".bench-venv" / "bin" / "python"),
        help="python of the benchmark-only venv (arq, SAQ, Flask, gunicorn)",
    )  # fmt: skip
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench-results", help="results file stem"
    )
    options = parser.parse_args(argv)
    if options.servers and not (
        set(options.servers) <= set(all_servers())
        and {ceiling_of(s) for s in options.servers if s != "flask"} <= set(options.servers)
    ):
        parser.error(
            f"--servers: any of {','.join(all_servers())}, each with its ceiling (bare, or "
            "bare-<server>)"
        )
    if options.baseline and not (options.baseline / "service" / "__init__.py").exists():
        parser.error(f"--baseline: no service/ in {options.baseline}")
    if options.rounds < 1 or options.duration <= 0 or options.jobs < 100:
        parser.error("--rounds at least 1, --duration above 0, --jobs at least 100")
    if (
        options.only not in ("consumers", "dashboard") and shutil.which("wrk") is None
    ):  # signup and pipeline
        parser.error("wrk is not installed (make bench installs it)")
    if not Path(options.bench_python).exists():
        parser.error(f"no benchmark venv at {options.bench_python} (make bench makes it)")
    cores = Cores.of_this_machine()
    print(f"cores: {cores.describe()}", flush=True)
    with scratch_server(cores=cores.load) as redis_url, _replica(redis_url, options.replica):
        client = redis.Redis.from_url(redis_url)
        everything = {"signup", "pipeline", "sizing", "consumers", "dashboard"}
        wanted = {options.only} if options.only else everything
        signup = bench_signup(options, redis_url, client, cores) if "signup" in wanted else {}
        pipeline = bench_pipeline(options, redis_url, client, cores) if "pipeline" in wanted else {}
        sizing = bench_sizing(options, redis_url, client, cores) if "sizing" in wanted else {}
        consumers = bench_consumers(options, redis_url, client) if "consumers" in wanted else {}
        dashboard = bench_dashboard(redis_url) if "dashboard" in wanted else {}
        client.close()
    report = table(options, signup, consumers, cores, pipeline, sizing, dashboard)
    print("\n" + report)
    options.results.with_suffix(".md").write_text(report + "\n")
    options.results.with_suffix(".json").write_text(
        json.dumps(
            {
                "signup": signup,
                "pipeline": pipeline,
                "sizing": sizing,
                "consumers": consumers,
                "dashboard": dashboard,
                "options": vars(options),
            },
            default=str,
            indent=2,
        )
    )
    print(f"\nwritten to {options.results.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
