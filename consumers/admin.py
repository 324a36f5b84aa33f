"""The operator's commands: ``dead list|requeue|delete|purge``, ``stats`` and ``check``.

Each prints what it did on stdout and returns the exit code; a Redis that cannot be reached is
one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pipeline.config import redact_url
from pipeline.connections import web_client
from pipeline.dead import DeadLetter, DeadLetters
from pipeline.keys import Keys
from pipeline.plan import Plan
from pipeline.stats import PipelineStats, read_stats, text

PROG = "python -m consumers"


async def operate(plan: Plan, options: argparse.Namespace) -> int:
    """Run one operator command; return the exit code."""
    settings = plan.settings
    redis = web_client(settings)
    keys = Keys(settings.key_prefix)
    try:
        if options.command == "stats":
            return _print_stats(await read_stats(redis, keys, plan.registry), as_json=options.json)
        if options.command == "check":
            return await _check(redis, keys)
        dead = DeadLetters(redis, keys, plan.registry)
        if options.dead_command == "list":
            return _print_dead(await dead.list(options.limit), as_json=options.json)
        if options.dead_command == "requeue":
            return await _requeue(dead, None if options.all else options.job_id)
        if options.dead_command == "delete":
            if not await dead.delete(options.job_id):
                print(f"{PROG}: error: job {options.job_id!r} is not among the dead letters",
                      file=sys.stderr)  # fmt: skip
                return 1
            print(f"deleted the dead letter of job {options.job_id}")
            return 0
        print(f"purged {await dead.purge()} dead letters")
        return 0
    except RedisError as exc:
        print(f"{PROG}: error: Redis at {redact_url(settings.redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()


async def _check(redis: aioredis.Redis, keys: Keys) -> int:
    """Exit 0 when at least one consumer holds a live lease (a container health check)."""
    registered = await redis.zrange(keys.consumers, 0, -1)
    ids = [text(i) for i in registered]
    leases = await redis.mget([keys.lease(i) for i in ids]) if ids else []
    live = sum(lease is not None for lease in leases)
    if live:
        print(f"ok: {live} live consumer{'s' if live != 1 else ''}")
        return 0
    why = f"{len(registered)} registered, every lease expired" if registered else "none registered"
    print(f"{PROG}: error: no consumer holds a live lease ({why})", file=sys.stderr)
    return 1


async def _requeue(dead: DeadLetters, job_id: str | None) -> int:
    requeued, skipped = await dead.requeue(job_id)
    if job_id is not None and requeued == 0:
        why = "cannot be decoded" if skipped else "is not among the dead letters"
        print(f"{PROG}: error: job {job_id!r} {why}", file=sys.stderr)
        return 1
    line = f"requeued {requeued} jobs"
    if skipped:
        line += f"; left {skipped} that cannot be decoded (see dead list)"
    print(line)
    return 0


def _when(epoch: Any) -> str:
    if not isinstance(epoch, int | float):
        return "?"
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _print_dead(entries: list[DeadLetter], *, as_json: bool) -> int:
    if as_json:  # one JSON document, [] for none, as every --json of the CLI prints
        sys.stdout.write(orjson.dumps([entry.to_json() for entry in entries]).decode() + "\n")
        return 0
    if not entries:
        print("no dead letters")
        return 0
    for entry in entries:
        tries = entry.attempts or entry.deliveries
        label = "attempts" if entry.attempts is not None else "deliveries"
        job = entry.job
        print(
            f"{_when(entry.failed_at)}  {entry.job_id or '-'}  "
            f"{job.type if job else '-'}  queue={entry.queue or '?'}  "
            f"{label}={tries if tries is not None else '?'}  {entry.reason or ''}"
        )
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _print_stats(stats: PipelineStats, *, as_json: bool) -> int:
    if as_json:
        sys.stdout.write(orjson.dumps(stats.to_json()).decode() + "\n")
        return 0
    print(
        f"{'queue':<10} {'waiting':>8} {'processing':>10} {'delayed':>8} "
        f"{'wait p50/p99 ms':>16} {'run p50/p99 ms':>15}"
    )
    for queue, latency in stats.latency.items():
        wait = f"{_ms(latency.wait_ms.p50)}/{_ms(latency.wait_ms.p99)}"
        run = f"{_ms(latency.run_ms.p50)}/{_ms(latency.run_ms.p99)}"
        print(
            f"{queue:<10} {stats.queues[queue]:>8} {stats.processing[queue]:>10} "
            f"{stats.delayed[queue]:>8} {wait:>16} {run:>15}"
        )
    print(f"dead letters: {stats.dead_letter}")
    print(f"live consumers: {len(stats.consumers)}")
    now = time.time()
    for consumer in stats.consumers:
        about = consumer.about
        queues = ", ".join(f"{q}x{n}" for q, n in about.get("queues", {}).items())
        up = now - float(about.get("started_at", now))
        print(f"  {consumer.id}  {about.get('mode', '?')}  {queues}  up {up:.0f} s")
    return 0
