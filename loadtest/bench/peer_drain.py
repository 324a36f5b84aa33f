"""Drain rates of the peers, in the benchmark-only environment (``.bench-venv``):

    python -m loadtest.bench.peer_drain (brpop | arq | saq) --url URL --jobs N --concurrency C

Each enqueues N no-op jobs its own way, runs C at a time, and times them from the first job
started to the N-th finished (start-up and enqueueing excluded, as for our consumers). The
last line is ``BENCH {"jobs", "seconds", "rss_mb"}``.

- ``brpop``: the hand-written loop of the classic pattern, C tasks each doing one BRPOP per
  job.
- ``arq``: arq's worker with ``max_jobs=C`` and ``poll_delay=0``.
- ``saq``: SAQ's worker with ``concurrency=C``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import psutil


class Clock:
    """First job started, N-th job finished."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.done = 0
        self.first: float | None = None
        self.last = 0.0
        self.finished = asyncio.Event()

    def started(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def ended(self) -> None:
        self.done += 1
        if self.done == self.jobs:
            self.last = time.perf_counter()
            self.finished.set()

    def seconds(self) -> float:
        assert self.first is not None
        return self.last - self.first


CLOCK: Clock


async def noop(ctx: Any, **kwargs: Any) -> None:
    CLOCK.started()
    CLOCK.ended()


async def _enqueue_all(enqueue: Any, jobs: int, batch: int = 500) -> None:
    for start in range(0, jobs, batch):
        await asyncio.gather(*(enqueue() for _ in range(start, min(jobs, start + batch))))


async def brpop(url: str, jobs: int, concurrency: int) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, max_connections=concurrency + 2)
    key = "peer:brpop"
    await client.delete(key)
    body = [json.dumps({"id": i, "type": "noop", "payload": {}}) for i in range(jobs)]
    for start in range(0, jobs, 1000):
        await client.lpush(key, *body[start : start + 1000])

    async def loop() -> None:
        while not CLOCK.finished.is_set():
            reply = await client.brpop([key], timeout=1)
            if reply is None:
                continue
            json.loads(reply[1])
            await noop(None)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    await client.aclose()


async def arq(url: str, jobs: int, concurrency: int) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    settings = RedisSettings.from_dsn(url)
    pool = await create_pool(settings)
    await pool.flushdb()
    await _enqueue_all(lambda: pool.enqueue_job("noop"), jobs)
    await pool.aclose()
    worker = Worker(
        functions=[func(noop, name="noop")],
        redis_settings=settings,
        burst=True,
        max_jobs=concurrency,
        poll_delay=0,
        handle_signals=False,
        keep_result=0,
    )
    await worker.async_run()
    await worker.close()


async def saq(url: str, jobs: int, concurrency: int) -> None:
    from saq import Queue, Worker

    queue = Queue.from_url(url)
    await queue.connect()
    await _enqueue_all(lambda: queue.enqueue("noop"), jobs)
    worker = Worker(queue, functions=[("noop", noop)], concurrency=concurrency)
    running = asyncio.create_task(worker.start())
    await CLOCK.finished.wait()
    await worker.stop()
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await queue.disconnect()


def main() -> int:
    global CLOCK
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.peer_drain")
    parser.add_argument("kind", choices=["brpop", "arq", "saq"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    options = parser.parse_args()
    CLOCK = Clock(options.jobs)
    run = {"brpop": brpop, "arq": arq, "saq": saq}[options.kind]
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run(options.url, options.jobs, options.concurrency))
    rss = psutil.Process().memory_info().rss / 2**20
    result = {"jobs": options.jobs, "seconds": CLOCK.seconds(), "rss_mb": round(rss, 1)}
    print("BENCH " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
