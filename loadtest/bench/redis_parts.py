"""``python -m loadtest.bench.redis_parts``: what each of a signup's Redis calls costs Redis.

End to end (``make bench --only pipeline``), Redis's CPU per signup moves with everything
else on the machine: how fast the web is decides how many signups share a commit, and the
load shares Redis's core. Here each part is called alone, the way the service calls it, on a
scratch server of its own that nothing else uses, and Redis's CPU (``INFO cpu``, from before
the part's calls to after them) is divided by the signups they served:

  commit       the signup commit (``UserStore.create``, the real receivers' jobs, the rate
               limit counted) for 1, 12 and 32 signups in one script call: one web worker's
               signups committing together, alone, under light load and under heavy load
  takes        a consumer's tick: each queue's take of the jobs of 12 signups, acknowledging
               the ones the tick before took, the three in one round trip (the consumer's
               own ``Broker`` and auto-pipeline); handlers that do nothing
  consumer     the same, with the real handlers (console email): their effects and reads in
               a round trip of their own, their done-markers with the acknowledgements

The parts alternate, in ``--rounds`` rounds (medians). This process runs on the last core and
the server on the others, when there are two or more. ``--root`` measures another checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: (part, signups per call): what is measured, in this order.
PARTS = (("commit", 1), ("commit", 12), ("commit", 32), ("takes", 12), ("consumer", 12))


async def _measure(redis_url: str, rounds: int, signups: int) -> dict[tuple[str, int], list[float]]:
    import redis
    import redis.asyncio as aioredis

    from consumers.cli import consumer_parts
    from pipeline.jobs import decode, new_id
    from pipeline.keys import Keys
    from pipeline.plan import resolve
    from pipeline.queue import Ack
    from pipeline.settings import RateLimit, Settings
    from pipeline.signals import user_signed_up
    from service.users import NewUser, SignupJobs, UserStore

    plan = resolve(Settings.from_env({"REDIS_URL": redis_url}))
    registry = plan.registry
    keys = Keys(plan.settings.key_prefix)
    info = redis.Redis.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    store = UserStore(client, keys, RateLimit(1_000_000, 1.0))  # counted, never reached
    receivers = registry.receivers(user_signed_up)
    handlers = registry.handlers()
    ctx, broker = consumer_parts(client, plan)
    ctx.settle_marks()  # as the consumer does: a handler's done-marker goes with its ack
    serial = iter(range(10**9))

    def redis_cpu() -> float:
        found = info.info("cpu")
        return float(found["used_cpu_sys"]) + float(found["used_cpu_user"])

    async def sign_up() -> None:
        number = next(serial)
        username = f"part{number}x{os.getpid()}"
        email = f"{username}@example.com"
        user = NewUser(new_id(), username, email, time.time(), username, email)
        jobs = SignupJobs(registry)
        for receiver in receivers:
            await receiver(None, jobs=jobs, user_id=user.user_id, username=username,
                           email=email, created_at=user.created_at)  # fmt: skip
        await store.create(user, jobs, 0, "127.0.0.1")

    async def commit(size: int) -> int:
        """The round's signups, ``size`` to a commit call; how many."""
        calls = max(1, signups // size)
        for _ in range(calls):
            await asyncio.gather(*(sign_up() for _ in range(size)))
        return calls * size

    async def run(raw: bytes, handled: bool) -> Ack:
        job = decode(raw)
        if handled:
            ctx.running(job.id)
            await handlers[job.type](ctx, job)
        counter = registry.job_types[job.type].counter or ""
        return Ack(raw, job.id, counter, ctx.take_mark(job.id))

    async def ticks(size: int, handled: bool) -> None:
        """Take the queued jobs, ``size`` a queue and tick, each tick acknowledging the
        jobs of the one before, as a consumer's fetch loops do under load."""
        acks: list[list[Ack]] = [[] for _ in registry.queues]
        while True:
            replies = await asyncio.gather(
                *(broker.take(q, size, a) for q, a in zip(registry.queues, acks, strict=True))
            )
            runs = [[run(raw, handled) for raw in raws] for raws, _ in replies]
            if not any(runs):
                return
            # Each queue's jobs at once, as the consumer's tasks: one round trip of effects.
            done = await asyncio.gather(*(asyncio.gather(*queue) for queue in runs))
            acks = [list(queue) for queue in done]

    results: dict[tuple[str, int], list[float]] = {part: [] for part in PARTS}
    async with registry.resources(ctx):
        for index in range(rounds):
            for part in PARTS if index % 2 == 0 else PARTS[::-1]:
                name, size = part
                info.execute_command("FLUSHALL", "SYNC")  # type: ignore[no-untyped-call]
                if name == "commit":
                    before = redis_cpu()
                    served = await commit(size)
                    used = redis_cpu() - before
                else:
                    served = await commit(size)  # queued first, not measured
                    await broker.heartbeat(60.0, {"part": "redis_parts"})  # held jobs: a lease
                    before = redis_cpu()
                    await ticks(size, handled=name == "consumer")
                    used = redis_cpu() - before
                    counted = await client.hmget(keys.stats, registry.effect_counters)
                    if any(int(value or 0) != served for value in counted):
                        raise RuntimeError(f"{served} signups' jobs, counted {counted}")
                figure = used / served * 1e6
                results[part].append(figure)
                print(f"round {index + 1}  {name:<8} x{size:<3} {figure:6.1f} us", flush=True)
    await client.aclose()
    info.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench.redis_parts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--signups", type=int, default=2400, help="signups per part a round")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure")
    parser.add_argument(
        "--redis-url", help="a Redis to use, emptied before each part (default: a scratch server)"
    )
    options = parser.parse_args(argv)
    if options.rounds < 1 or options.signups < 32:
        parser.error("--rounds at least 1, --signups at least 32")
    sys.path.insert(0, str(options.root.resolve()))
    from devtools.embedded_redis import scratch_server
    from loadtest.bench.__main__ import Cores

    logging.basicConfig(level=logging.WARNING)  # the console email's lines are not the part's
    cores = Cores.of_this_machine()
    print(f"cores: {cores.describe().replace('wrk and Redis', 'Redis')}", flush=True)
    if cores.server is not None:
        os.sched_setaffinity(0, cores.server)  # this process: the "server" of the calls
    if options.redis_url:
        results = asyncio.run(_measure(options.redis_url, options.rounds, options.signups))
    else:
        with scratch_server(cores=cores.load) as redis_url:
            results = asyncio.run(_measure(redis_url, options.rounds, options.signups))
    print(f"\n{options.root}: Redis CPU per signup, median of {options.rounds} rounds")
    for (name, size), figures in results.items():
        rounds = ", ".join(f"{figure:.1f}" for figure in figures)
        print(f"  {name:<8} x{size:<3} {statistics.median(figures):6.1f} us  ({rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
