"""Consumer drain rate: jobs/s of one ``python -m consumers`` process, per delivery mode.

``python -m loadtest.drain [--jobs N] [--rounds R] [--concurrency C] [--json PATH]``

Starts its own redis-server (no persistence) on a free port. Each round, for each mode in
turn (alternating, so both see the same machine), it fills the marketing-list update's queue
with N of its jobs, starts a consumer process on that queue (``--handler real``: the
real handler; ``noop``: the same consumer with handlers that do nothing), and times the jobs
from the first taken to the last done (neither queued nor held), so process start-up is not
counted. Prints the median of the
rounds per mode and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis.asyncio as aioredis

from devtools.embedded_redis import scratch_server
from pipeline.jobs import new_job
from pipeline.keys import Keys
from pipeline.settings import DELIVERY_MODES
from reactions.marketing import MARKETING_SIGNUP

ROOT = Path(__file__).resolve().parent.parent
#: The job drained: the marketing-list update (its handler is one command, ZADD NX).
JOB = MARKETING_SIGNUP
HANDLERS_DESCRIBED = {
    "real": f"{JOB} (one ZADD NX; counted with its acknowledgement)",
    "noop": "a no-op handler (the queue machinery alone)",
}
PREFIX = "drain"


async def _fill(redis: aioredis.Redis, keys: Keys, jobs: int, traced: bool = False) -> None:
    """Queue ``jobs`` jobs; ``traced``: each with a signup's trace context, as the web queues
    them with tracing on."""
    await redis.execute_command("FLUSHALL", "SYNC")  # type: ignore[no-untyped-call]  # not freed in the background
    batch = 1000
    for start in range(0, jobs, batch):
        encoded = [
            dataclasses.replace(
                new_job(JOB.name, {"email": f"u{i}@example.com", "signed_up_at": i}),
                traceparent=f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
                if traced
                else None,
            ).encode()
            for i in range(start, min(jobs, start + batch))
        ]
        await redis.lpush(keys.queue(JOB.queue), *encoded)


async def _remaining(redis: aioredis.Redis, keys: Keys) -> int:
    """Jobs not yet done: queued, or held by the consumer (at-least-once)."""
    pipe = redis.pipeline(transaction=False)
    pipe.llen(keys.queue(JOB.queue))
    held = [key async for key in redis.scan_iter(match=f"{keys.prefix}:processing:*")]
    for key in held:
        pipe.llen(key)
    return sum(int(n) for n in await pipe.execute())


async def drain_round(
    url: str, mode: str, jobs: int, concurrency: int, handler: str, otlp: str | None = None
) -> tuple[float, float, float]:
    """One drain of ``jobs`` jobs: jobs/s from the first taken to the last done, the
    consumer's RSS (MB) at the end, and its CPU per job (µs) over the same span. ``otlp``:
    tracing on, exporting there (the jobs then carry a signup's trace context)."""
    redis = aioredis.Redis.from_url(url)
    keys = Keys(PREFIX)
    await _fill(redis, keys, jobs, traced=otlp is not None)
    env = {
        **os.environ,
        "REDIS_URL": url,
        "KEY_PREFIX": PREFIX,
        "LOG_LEVEL": "WARNING",
        "DELIVERY_MODE": mode,
        "CONSUMER_QUEUES": JOB.queue,
        "CONSUMER_CONCURRENCY": f"{JOB.queue}={concurrency}",
    }
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    if otlp is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp
    # A blocking start is fine: nothing else runs on this loop.
    module = "consumers" if handler == "real" else "loadtest.noop_consumer"
    process = subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT)  # noqa: ASYNC220
    measured = psutil.Process(process.pid)
    try:
        deadline = time.monotonic() + 300
        while (left := await _remaining(redis, keys)) == jobs:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the consumer exited or stalled ({mode})")
            await asyncio.sleep(0.002)
        began, first = time.perf_counter(), jobs - left
        cpu = sum(measured.cpu_times()[:2])
        while (left := await _remaining(redis, keys)) > 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the consumer exited or stalled, {left} left ({mode})")
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - began
        cpu = sum(measured.cpu_times()[:2]) - cpu
        rss = measured.memory_info().rss / 2**20
    finally:
        process.terminate()
        process.wait(30)
        await redis.aclose()
    return (jobs - first) / elapsed, rss, cpu / (jobs - first) * 1e6


async def _rounds(
    url: str, jobs: int, rounds: int, concurrency: int, handler: str
) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {mode: [] for mode in DELIVERY_MODES}
    for index in range(rounds):
        order = DELIVERY_MODES if index % 2 == 0 else DELIVERY_MODES[::-1]
        for mode in order:
            rate, _, _ = await drain_round(url, mode, jobs, concurrency, handler)
            rates[mode].append(rate)
            print(f"round {index + 1}: {mode:<14} {rate:>8,.0f} jobs/s", flush=True)
    return rates


def _run(jobs: int, rounds: int, concurrency: int, handler: str) -> dict[str, Any]:
    with scratch_server() as url:
        rates = asyncio.run(_rounds(url, jobs, rounds, concurrency, handler))
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    return {
        "jobs": jobs,
        "rounds": rounds,
        "concurrency": concurrency,
        "handler": HANDLERS_DESCRIBED[handler],
        "rates": rates,
        "medians": medians,
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.drain", description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per round (20000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (3)")
    parser.add_argument("--concurrency", type=int, default=8, help="consumer tasks (8)")
    parser.add_argument(
        "--handler",
        choices=sorted(HANDLERS_DESCRIBED),
        default="real",
        help=f"real: the {JOB} handler; noop: a handler doing nothing (real)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args(argv)
    if options.jobs < 100 or options.rounds < 1 or options.concurrency < 1:
        parser.error("--jobs must be at least 100, --rounds and --concurrency at least 1")
    result = _run(options.jobs, options.rounds, options.concurrency, options.handler)
    medians = result["medians"]
    print(
        f"\nmedian of {options.rounds} rounds, {options.jobs} jobs, {options.concurrency} tasks, "
        f"{HANDLERS_DESCRIBED[options.handler]}:"
    )
    for mode, rate in medians.items():
        print(f"  {mode:<14} {rate:>8,.0f} jobs/s")
    ratio = medians["at-least-once"] / medians["at-most-once"]
    print(f"  at-least-once / at-most-once: {ratio:.2f}")
    if options.json:
        options.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
