"""The consumer runner: fetch loops, handler tasks, and a graceful drain.

Each queue has one fetch loop that BRPOPs (short block) while fewer than its concurrency of
jobs are running, and starts each job as a task, so a slow job never blocks fetching.

Stopping: ``stop`` is set (SIGTERM / SIGINT). Fetch loops are never cancelled - a BRPOP reply
cancelled in flight would lose the job the server already popped - they see the flag when
their block times out and exit. In-flight jobs get the grace period, counted from the signal;
jobs still running then (or at once when ``force`` is set) are cancelled and returned to the
head of their queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from consumers.handlers import Handler, HandlerContext
from pipeline.errors import JobDecodeError
from pipeline.jobs import decode
from pipeline.keys import Keys
from pipeline.queue import dead_letter, fetch, return_job

logger = logging.getLogger(__name__)

#: Backoff between fetch attempts while Redis is unreachable: doubles up to the cap.
BACKOFF_START, BACKOFF_CAP = 0.1, 2.0
#: How long a cancelled job may take to unwind, and how often it is cancelled again if it
#: swallows the cancellation (some clients wait for a polite goodbye on the way out).
CANCEL_WAIT, CANCEL_TRIES = 1.0, 3


@dataclass(frozen=True, slots=True)
class _InFlight:
    queue: str
    raw: bytes


class Consumer:
    """Runs the queues of one consumer process until told to stop."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        handlers: Mapping[str, Handler],
        context: HandlerContext,
        *,
        concurrency: Mapping[str, int],
        fetch_timeout: float,
        grace_period: float,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._handlers = handlers
        self._context = context
        self._concurrency = dict(concurrency)
        self._fetch_timeout = fetch_timeout
        self._grace_period = grace_period
        self._in_flight: dict[asyncio.Task[None], _InFlight] = {}

    async def run(self, stop: asyncio.Event, force: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set, then drain. ``force`` cuts the grace period short."""
        force = force or asyncio.Event()
        loops = {
            asyncio.create_task(self._fetch_loop(queue, stop), name=f"fetch:{queue}")
            for queue in self._concurrency
        }
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({*loops, stopped}, return_when=asyncio.FIRST_COMPLETED)
        deadline = asyncio.get_running_loop().time() + self._grace_period
        crashed = [task for task in done if task in loops and task.exception() is not None]
        stop.set()
        stopped.cancel()
        # Fetch loops end by themselves at their next block timeout.
        await asyncio.wait(loops)
        await self._drain(deadline, force)
        for task in crashed:
            raise RuntimeError(f"{task.get_name()} crashed") from task.exception()

    async def _fetch_loop(self, queue: str, stop: asyncio.Event) -> None:
        limit = self._concurrency[queue]
        running: set[asyncio.Task[None]] = set()
        stopped = asyncio.create_task(stop.wait())
        backoff = 0.0
        try:
            while not stop.is_set():
                if len(running) >= limit:
                    await asyncio.wait({*running, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    raw = await fetch(self._redis, self._keys, queue, self._fetch_timeout)
                except RedisError as exc:
                    if not backoff:
                        logger.warning("queue %s: Redis unreachable (%s); retrying", queue, exc)
                    backoff = min(max(backoff * 2, BACKOFF_START), BACKOFF_CAP)
                    # Back off, but wake at once when told to stop.
                    await asyncio.wait({stopped}, timeout=backoff)
                    continue
                if backoff:
                    logger.warning("queue %s: Redis reachable again; resuming", queue)
                    backoff = 0.0
                if raw is None:
                    continue
                task = asyncio.create_task(self._process(queue, raw))
                self._in_flight[task] = _InFlight(queue, raw)
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(self._forget)
        finally:
            stopped.cancel()

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)

    async def _process(self, queue: str, raw: bytes) -> None:
        try:
            job = decode(raw)
        except JobDecodeError as exc:
            await self._dead_letter(queue, raw, f"undecodable job: {exc}")
            return
        handler = self._handlers.get(job.type)
        if handler is None:
            await self._dead_letter(queue, raw, f"unknown job type {job.type!r}")
            return
        started = time.monotonic()
        try:
            await handler(self._context, job)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # Redis, not the job, failed: put the job back rather than dead-letter it.
            logger.warning(
                "job %s (%s): Redis unavailable (%s); returning it", job.id, job.type, exc
            )
            await self._return(_InFlight(queue, raw))
            return
        except Exception as exc:
            logger.exception("job %s (%s) failed", job.id, job.type)
            await self._dead_letter(queue, raw, f"handler failed: {exc!r}")
            return
        logger.debug(
            "job %s (%s) done in %.1f ms", job.id, job.type, (time.monotonic() - started) * 1e3
        )

    async def _dead_letter(self, queue: str, raw: bytes, reason: str) -> None:
        logger.error("queue %s: dead-lettering a job: %s", queue, reason)
        try:
            await dead_letter(self._redis, self._keys, queue, raw, reason)
        except RedisError as exc:
            logger.critical("queue %s: could not dead-letter %r (%s): job lost", queue, raw, exc)

    async def _drain(self, deadline: float, force: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        forced = asyncio.create_task(force.wait())
        try:
            if self._in_flight:
                logger.info(
                    "stopping: waiting up to %.1f s for %d in-flight jobs",
                    max(0.0, deadline - loop.time()),
                    len(self._in_flight),
                )
            while self._in_flight and not force.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait(
                    {*self._in_flight, forced},
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            forced.cancel()
        leftovers = dict(self._in_flight)
        if not leftovers:
            return
        logger.warning("stopping: cancelling %d jobs still running", len(leftovers))
        pending = set(leftovers)
        for _ in range(CANCEL_TRIES):
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=CANCEL_WAIT)
            if not pending:
                break
        for task, job in leftovers.items():
            # A job that finished while being cancelled is done; every other one goes back.
            if not task.done() or task.cancelled():
                await self._return(job)

    async def _return(self, job: _InFlight) -> None:
        try:
            await return_job(self._redis, self._keys, job.queue, job.raw)
            logger.info("queue %s: returned an unfinished job to the queue", job.queue)
        except RedisError as exc:
            logger.critical("queue %s: could not return %r (%s): job lost", job.queue, job.raw, exc)
