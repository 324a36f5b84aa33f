"""The consumer runner: fetch loops, handler tasks, retries, the lease, recovery, and a
graceful drain.

Each queue has one fetch loop. Per round trip it acknowledges the jobs finished since the last
one, counting each under its type's stats counter, and takes up to the free slots' worth of new
ones (blocking only when the queue is empty), and starts each job as a task, so a slow job
never blocks fetching. A job runs under its type's timeout. A failed one is then settled in one
script: scheduled for a retry with exponential backoff and jitter, or dead-lettered after its
last attempt.

Beside the fetch loops: the heartbeat renews this consumer's lease (from before the first
fetch until the last job is settled), the watchdog cancels handlers past their timeout, the
sweeper recovers the jobs of consumers whose lease expired, and the maintainer promotes due
retries and records latency samples.

Stopping: ``stop`` is set (SIGTERM / SIGINT). Fetch loops are never cancelled - a blocking
pop cancelled in flight would lose the job the server already popped - they see the flag when
their block times out and exit. In-flight jobs get the grace period, counted from the signal;
jobs still running then (or at once when ``force`` is set) are cancelled and returned to the
head of their queue, without counting as an attempt. Last, the lease is given up and anything
still held is returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from redis.exceptions import RedisError

from consumers.metrics import ConsumerMetrics
from pipeline import logs, tracing
from pipeline.connections import REDIS_UNAVAILABLE
from pipeline.context import Context
from pipeline.dead import DeadLetter
from pipeline.errors import InvalidJobError, JobDecodeError
from pipeline.jobs import Job, decode
from pipeline.outage import Outage
from pipeline.plan import Plan
from pipeline.queue import LATENCY_FLUSH_INTERVAL, Ack, Broker, delivery_id
from pipeline.registry import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT, Handler

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Backoff between attempts while Redis is unreachable: doubles up to the cap.
BACKOFF_START, BACKOFF_CAP = 0.1, 2.0
#: How long a cancelled job may take to unwind, and how often it is cancelled again if it
#: swallows the cancellation (some clients wait for a polite goodbye on the way out).
CANCEL_WAIT, CANCEL_TRIES = 1.0, 3
#: How often due retries are promoted (latency samples: LATENCY_FLUSH_INTERVAL).
PROMOTE_INTERVAL: Final = 0.25
#: How often the watchdog looks for jobs past their timeout (its precision).
WATCHDOG_INTERVAL: Final = 0.1
#: How long a fetch loop whose finished jobs leave others still running waits for more of
#: them to finish before it takes again: a take costs Redis about the same for one job as for
#: several (its cost is the round trip), so under load this trades up to 2 ms of queue wait
#: for fewer, fuller takes (and effects that share their round trips). A loop with nothing
#: running takes at once, and jobs finishing together are taken together without waiting.
TAKE_LINGER: Final = 0.002
#: How long a fetch loop woken by its blocking fetch (its queue was empty: the consumer keeps
#: up) waits before it takes the rest and starts them all: the commits of that moment's
#: signups, together rather than one chain of round trips each (take, effects, acks). Only an
#: idle loop waits, so it costs queue wait, never throughput.
WAKE_LINGER: Final = 0.005
#: A dead consumer is forgotten this many lease periods after it was last seen (until then
#: the sweeper still looks at its processing lists).
FORGET_AFTER_LEASES: Final = 12


@dataclass(frozen=True, slots=True)
class _InFlight:
    queue: str
    raw: bytes


def _type_of(raw: bytes) -> str | None:
    try:
        return decode(raw).type
    except JobDecodeError:
        return None


class _Backoff:
    """One loop's way through an outage: "Redis failed: note the outage, back off, try again".
    Each failure is noted (logged once per outage, not per loop) and waited out, from
    BACKOFF_START doubling up to BACKOFF_CAP; a success notes that Redis is back and starts the
    next wait from the beginning."""

    def __init__(self, outage: Outage) -> None:
        self._outage = outage
        self._delay = 0.0

    async def failed(self, exc: Exception, wait: Callable[[float], Awaitable[Any]]) -> None:
        """Note ``exc``, then ``wait`` the next delay (a wait that a stop may cut short)."""
        self._outage.failed(exc)
        self._delay = min(max(self._delay * 2, BACKOFF_START), BACKOFF_CAP)
        await wait(self._delay)

    def ok(self) -> None:
        self._outage.ok()
        self._delay = 0.0


def retry_delay(attempts: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: half of ``base * 2**(attempts - 1)`` (capped), plus a
    random part up to the other half, so retries of jobs that failed together spread out."""
    ceiling = min(cap, base * 2.0 ** (attempts - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Consumer:
    """Runs the configured queues of one consumer process until told to stop."""

    def __init__(
        self,
        broker: Broker,
        handlers: Mapping[str, Handler],
        context: Context,
        plan: Plan,
        metrics: ConsumerMetrics | None = None,
    ) -> None:
        self._broker = broker
        self._metrics = metrics if metrics is not None else ConsumerMetrics(plan.registry)
        self._handlers = handlers
        self._context = context
        # A handler's done-marker for its own job goes with the job's settlement (unless
        # replicas must confirm it: see Context.settle_marks).
        context.settle_marks()
        self._settings = plan.settings
        self._plan = plan
        self._concurrency = dict(plan.concurrency)
        self._in_flight: dict[asyncio.Task[None], _InFlight] = {}
        self._samples: dict[str, list[tuple[float, float]]] = {q: [] for q in self._concurrency}
        #: Jobs done and failed (retried or dead-lettered) since the history was last written.
        self._tally = {"done": 0, "failed": 0}
        #: Per queue: jobs done whose ack (and count) goes with the fetch loop's next take.
        self._acks: dict[str, list[Ack]] = {q: [] for q in self._concurrency}
        #: Each job type's stats counter ('' for none), added to when one of its jobs is acked.
        self._counters = {
            name: job_type.counter or "" for name, job_type in plan.registry.job_types.items()
        }
        #: Per queue: set when one of its jobs finishes (or on stop), to wake a full fetch loop.
        self._freed = {q: asyncio.Event() for q in self._concurrency}
        #: Running handlers' deadlines (monotonic), and those the watchdog cancelled for it.
        self._deadlines: dict[asyncio.Task[None], float] = {}
        self._timed_out: set[asyncio.Task[None]] = set()
        self._outage = Outage(logger, "retrying with backoff", resuming="resuming")
        self._leased = asyncio.Event()
        self._drained = asyncio.Event()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._deadline: float | None = None
        #: How long a fetch loop waits for busy slots to free before taking (TAKE_LINGER).
        self.take_linger = TAKE_LINGER
        #: How long a fetch loop woken by its blocking fetch waits to take more (WAKE_LINGER).
        self.wake_linger = WAKE_LINGER

    @property
    def consumer_id(self) -> str:
        return self._broker.consumer_id

    @property
    def metrics(self) -> ConsumerMetrics:
        """This consumer's Prometheus metrics."""
        return self._metrics

    async def run(self, stop: asyncio.Event, force: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set, then drain. ``force`` cuts the grace period short."""
        self._stop, self._force = stop, force or asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        loops = {
            asyncio.create_task(self._fetch_loop(queue), name=f"fetch:{queue}")
            for queue in self._concurrency
        }
        loops.add(asyncio.create_task(self._sweep(), name="sweeper"))
        loops.add(asyncio.create_task(self._maintain(), name="maintainer"))
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait(
            {*loops, heartbeat, watchdog, stopped}, return_when=asyncio.FIRST_COMPLETED
        )
        self._deadline = asyncio.get_running_loop().time() + self._settings.shutdown_grace_period
        crashed = [t for t in done if t is not stopped and t.exception() is not None]
        stop.set()
        stopped.cancel()
        for freed in self._freed.values():
            freed.set()
        # Loops end by themselves: fetches at their next block timeout, the others at once.
        await asyncio.wait(loops)
        await self._drain()
        await self._flush_acks()
        await self._flush_latency()
        self._drained.set()
        await asyncio.wait({heartbeat, watchdog})
        await self._release()
        for task in crashed:
            raise RuntimeError(f"{task.get_name()} crashed") from task.exception()

    # --- fetching ---------------------------------------------------------------------

    async def _fetch_loop(self, queue: str) -> None:
        limit = self._concurrency[queue]
        running: set[asyncio.Task[None]] = set()
        freed = self._freed[queue]

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            self._in_flight.pop(task, None)
            freed.set()

        # Never hold a job without a lease: wait for the first heartbeat.
        if not await self._until(self._leased):
            return
        backoff = _Backoff(self._outage)
        reconciled = time.monotonic()
        suspect = False
        loop = asyncio.get_running_loop()
        linger_until: float | None = None
        while not self._stop.is_set():
            free = limit - len(running)
            if free <= 0:
                freed.clear()
                await freed.wait()  # a job finished, or the stop (run() sets it)
                continue
            # Some slots still busy: let more of them finish (TAKE_LINGER).
            if running:
                linger_until = linger_until or loop.time() + self.take_linger
                if loop.time() < linger_until:
                    freed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(linger_until):
                            await freed.wait()
                    continue
            linger_until = None
            woken: bytes | None = None
            try:
                if suspect or time.monotonic() - reconciled >= self._settings.lease_ttl:
                    await self._reconcile(queue)
                    reconciled, suspect = time.monotonic(), False
                raws = await self._take(queue, free)
                if not raws:
                    woken = await self._broker.fetch(queue, self._settings.fetch_timeout)
                    if woken is not None:
                        # Woken with one job of a commit: the rest of it came at the same
                        # moment, and more may follow (WAKE_LINGER); all start together, so
                        # their effects and acks share round trips.
                        if self.wake_linger > 0:
                            await self._until(timeout=self.wake_linger)
                        raws = [woken]
                        if not self._stop.is_set():
                            raws += await self._take(queue, free - 1)
            except RedisError as exc:
                suspect = True
                await backoff.failed(exc, lambda delay: self._until(timeout=delay))
                if woken is None:
                    continue
                raws = [woken]  # fetched before the failure: it runs
            else:
                backoff.ok()
            for raw in raws:
                task = asyncio.create_task(self._process(queue, raw))
                self._in_flight[task] = _InFlight(queue, raw)
                running.add(task)
                task.add_done_callback(finished)

    async def _take(self, queue: str, count: int) -> list[bytes]:
        """Acknowledge the jobs of ``queue`` done since the last take and take up to ``count``
        more, in one round trip. If it fails, the acks go with the next one."""
        acks, self._acks[queue] = self._acks[queue], []
        try:
            raws, found = await self._broker.take(queue, count, acks)
        except RedisError:
            self._acks[queue][:0] = acks
            raise
        if found < len(acks):
            logger.warning(
                "queue %s: %d jobs finished after being recovered from this consumer (its "
                "lease lapsed); another delivery will find them done",
                queue,
                len(acks) - found,
            )
        return raws

    async def _reconcile(self, queue: str) -> None:
        """Return held jobs this consumer is not running. A fetch whose reply was lost (the
        connection dropped after Redis moved the job; the client's retry then fetched again)
        leaves one behind in the processing list. Only the queue's fetch loop calls this,
        between fetches, so no fetch into the list is under way; finished jobs whose ack is
        not sent yet are not orphans."""
        if self._broker.mode != "at-least-once":
            return
        known = {job.raw for job in self._in_flight.values() if job.queue == queue}
        known.update(ack.raw for ack in self._acks[queue])
        orphans = [raw for raw in await self._broker.held(queue) if raw not in known]
        for raw in orphans:
            await self._broker.return_job(queue, raw)
        if orphans:
            logger.warning(
                "queue %s: returned %d held jobs this consumer was not running (a fetch reply "
                "was lost)",
                queue,
                len(orphans),
            )

    async def _flush_acks(self) -> None:
        """Send the acks still waiting for a fetch loop's next round trip (on the way out)."""
        for queue, acks in self._acks.items():
            if acks:
                self._acks[queue] = []
                await self._settle(
                    f"acks on {queue}", functools.partial(self._broker.take, queue, 0, acks)
                )

    async def _until(
        self, *waitables: asyncio.Event | asyncio.Task[None], timeout: float | None = None
    ) -> bool:
        """Wait for any of ``waitables`` (events or tasks), ``timeout``, or the stop flag,
        whichever comes first. True unless it was the stop flag."""
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._stop.wait())}
        for item in waitables:
            waiters.add(
                item if isinstance(item, asyncio.Task) else asyncio.ensure_future(item.wait())
            )
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                if waiter not in waitables:  # never cancel a job task
                    waiter.cancel()
        return not self._stop.is_set()

    # --- running one job ----------------------------------------------------------------

    async def _process(self, queue: str, raw: bytes) -> None:
        try:
            job = decode(raw)
        except JobDecodeError as exc:
            await self._dead_letter(queue, raw, None, f"undecodable job: {exc}")
            return
        # Every line logged while the job runs carries its id and its signup's request id.
        logs.job_id.set(job.id)
        logs.request_id.set(job.request_id)
        if tracing.tracer is None:
            await self._run(queue, raw, job)
            return
        # Tracing on: the attempt is a span in its signup's trace (and its lines carry it).
        with tracing.job_span(queue, job) as span:
            outcome, error, why = await self._run(queue, raw, job)
            tracing.job_outcome(span, outcome, error, why)

    async def _run(
        self, queue: str, raw: bytes, job: Job
    ) -> tuple[str, BaseException | None, str | None]:
        """Run one attempt of ``job`` and settle it. Returns the outcome (succeeded, retried,
        dead_lettered, returned; unsettled if settling never succeeded), and for a failure
        the exception and why."""
        handler = self._handlers.get(job.type)
        if handler is None:
            why = f"unknown job type {job.type!r}"
            settled = await self._dead_letter(queue, raw, job, why)
            return "dead_lettered" if settled else "unsettled", None, why
        limit = self._plan.timeouts.get(job.type, DEFAULT_TIMEOUT)
        started, clock = time.time(), time.monotonic()
        wait = max(0.0, started - job.enqueued_at)
        self._metrics.waited(queue, wait)
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = clock + limit
        failure: tuple[str, BaseException] | None = None
        redis_down: Exception | None = None
        try:
            self._context.running(job.id)
            await handler(self._context, job)
        except asyncio.CancelledError as exc:
            # The watchdog's cancellation, and no other (a stop's comes on top), is a timeout.
            if task not in self._timed_out or task.uncancel() > 0:
                raise
            failure = (f"timed out after {limit:g} s", exc)
        except REDIS_UNAVAILABLE as exc:
            redis_down = exc
        except Exception as exc:
            failure = (f"{type(exc).__name__}: {exc}", exc)
        finally:
            # The handler is over: settling below is not under its timeout.
            self._deadlines.pop(task, None)
            self._timed_out.discard(task)
        run = time.monotonic() - clock
        if redis_down is not None:
            # Redis, not the job, failed: put the job back, not counting an attempt.
            logger.warning(
                "job %s (%s): Redis unavailable (%s); returning it", job.id, job.type, redis_down
            )
            mark = self._context.take_mark(job.id)
            returning = functools.partial(self._broker.return_job, queue, raw, marker=mark)
            if not await self._settle(job.id, returning):
                return "unsettled", redis_down, None
            self._metrics.finished(job.type, "returned")
            return "returned", redis_down, None
        self._metrics.ran(job.type, run)
        if failure is not None:
            return await self._failed(queue, raw, job, *failure), failure[1], failure[0]
        self._finished(job.type, "succeeded")
        self._samples[queue].append((wait, run))
        # Counted when acknowledged (at-most-once too: the count goes with the next take).
        counter = self._counters.get(job.type, "")
        self._acks[queue].append(Ack(raw, job.id, counter, self._context.take_mark(job.id)))
        return "succeeded", None, None

    async def _failed(
        self, queue: str, raw: bytes, job: Job, error: str, exc: BaseException
    ) -> str:
        """Retry the job, or dead-letter it after its last attempt (or if it is invalid).
        Returns "retried", "dead_lettered", or "unsettled" when neither could be written."""
        attempts = job.attempt + 1
        allowed = self._plan.attempts.get(job.type, DEFAULT_ATTEMPTS)
        exc_info = (type(exc), exc, exc.__traceback__)
        dead = attempts >= allowed or isinstance(exc, InvalidJobError)
        delay = retry_delay(
            attempts, self._settings.retry_base_delay, self._settings.retry_max_delay
        )
        logger.log(
            logging.ERROR if dead else logging.WARNING,
            "job %s (%s) failed attempt %d of %d: %s; %s",
            job.id,
            job.type,
            attempts,
            allowed,
            error,
            "dead-lettering it" if dead else f"retrying in {delay:.2f} s",
            exc_info=exc_info,
        )
        if dead:
            reason = (
                f"invalid job: {exc}"
                if isinstance(exc, InvalidJobError)
                else f"failed {attempts} attempts; last: {error}"
            )
            settled = await self._dead_letter(queue, raw, job, reason, error=error)
            return "dead_lettered" if settled else "unsettled"
        retried = dataclasses.replace(
            job,
            attempt=attempts,
            enqueued_at=time.time() + delay,
            # Tracing on: the retry's span links to the first attempt's (this one's, the first
            # time).
            first_attempt=job.first_attempt or tracing.current_traceparent(),
        )
        mark = self._context.take_mark(job.id)
        retrying = functools.partial(self._broker.retry, queue, raw, retried, delay, marker=mark)
        if not await self._settle(job.id, retrying):
            return "unsettled"
        self._finished(job.type, "retried")
        return "retried"

    async def _dead_letter(
        self, queue: str, raw: bytes, job: Job | None, reason: str, error: str | None = None
    ) -> bool:
        if job is None:
            logger.error("queue %s: dead-lettering a job: %s", queue, reason)
        entry = DeadLetter.for_job(queue, raw, reason, job=job, error=error).encode()
        # An undecodable job's deliveries are counted under its delivery_id: clear that.
        job_id = job.id if job else delivery_id(raw)
        mark = self._context.take_mark(job.id) if job else ""
        if not await self._settle(
            job_id, lambda: self._broker.dead_letter(queue, raw, entry, job_id, marker=mark)
        ):
            return False
        self._finished(job.type if job else None, "dead_lettered")
        return True

    async def _settle(self, job_id: str, operation: Callable[[], Awaitable[T]]) -> T | None:
        """Run a settling operation, retrying through a Redis outage until it succeeds or the
        stop's deadline passes. None if it never succeeded."""
        backoff = _Backoff(self._outage)
        while True:
            try:
                result = await operation()
            except RedisError as exc:
                if self._past_deadline():
                    self._outage.failed(exc)
                    if self._broker.mode == "at-least-once":
                        logger.error(
                            "job %s: could not settle it (%s); it stays held and is returned "
                            "when this consumer's lease expires",
                            job_id,
                            exc,
                        )
                    else:
                        logger.critical("job %s: could not settle it (%s): job lost", job_id, exc)
                    return None
                await backoff.failed(exc, lambda delay: self._pause(self._force, delay))
                continue
            backoff.ok()
            return result

    def _past_deadline(self) -> bool:
        if self._force.is_set():
            return True
        return self._deadline is not None and asyncio.get_running_loop().time() >= self._deadline

    # --- lease, recovery, retries, measurements -------------------------------------------

    async def _heartbeat(self) -> None:
        """Hold the lease until the drain is over. Renewed every third of its lifetime."""
        ttl = self._settings.lease_ttl
        about = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self._concurrency,
            "mode": self._broker.mode,
            "started_at": time.time(),
        }
        backoff = _Backoff(self._outage)
        while not self._drained.is_set():
            about["in_flight"] = len(self._in_flight)  # as of this renewal (the dashboard's)
            try:
                held = await self._broker.heartbeat(ttl, about)
            except RedisError as exc:
                await backoff.failed(exc, lambda delay: self._pause(self._drained, delay))
                continue
            backoff.ok()
            if not held and self._leased.is_set():
                logger.warning(
                    "consumer %s: its lease had lapsed; jobs it held may have been handed to "
                    "another consumer (their effects still happen once)",
                    self.consumer_id,
                )
            self._leased.set()
            await self._pause(self._drained, ttl / 3)

    async def _watchdog(self) -> None:
        """Cancel handlers past their type's ``JOB_TIMEOUT``, checked every WATCHDOG_INTERVAL:
        one task for all jobs, instead of a timer armed and disarmed around each one."""
        while not self._drained.is_set():
            now = time.monotonic()
            for task, deadline in self._deadlines.items():
                if deadline <= now and task not in self._timed_out:
                    self._timed_out.add(task)
                    task.cancel()
            await self._pause(self._drained, WATCHDOG_INTERVAL)

    async def _sweep(self) -> None:
        """Recover the jobs of consumers whose lease expired, at start-up and every second or
        so. Not right after an outage: live consumers first get a lease period to renew."""
        ttl = self._settings.lease_ttl
        interval = min(1.0, max(0.2, ttl / 5))
        while not self._stop.is_set():
            if self._outage.quiet_for(ttl):
                try:
                    await self._recover_expired(ttl)
                except RedisError as exc:
                    self._outage.failed(exc)
            await self._until(timeout=interval)

    async def _recover_expired(self, ttl: float) -> None:
        for consumer_id in await self._broker.expired_consumers():
            returned, dead = await self._broker.recover(
                consumer_id,
                max_deliveries=self._settings.max_deliveries,
                forget_after=ttl * FORGET_AFTER_LEASES,
            )
            if returned > 0 or dead > 0:
                self._metrics.recovered.labels("returned").inc(returned)
                self._metrics.recovered.labels("dead_lettered").inc(dead)
                logger.warning(
                    "recovered consumer %s (lease expired): %d jobs returned to their queues, "
                    "%d dead-lettered after %d deliveries",
                    consumer_id,
                    returned,
                    dead,
                    self._settings.max_deliveries,
                )

    def _finished(self, job_type: str | None, outcome: str) -> None:
        """Count a job's outcome: in the metrics, and for the dashboard's history."""
        self._metrics.finished(job_type, outcome)
        if outcome == "succeeded":
            self._tally["done"] += 1
        elif outcome in ("retried", "dead_lettered"):
            self._tally["failed"] += 1

    async def _maintain(self) -> None:
        """Promote due retries; write latency samples and the history every second."""
        flushed = time.monotonic()
        while not self._stop.is_set():
            try:
                while await self._broker.promote(self._concurrency) > 0:
                    pass
                if time.monotonic() - flushed >= LATENCY_FLUSH_INTERVAL:
                    flushed = time.monotonic()
                    await self._flush_latency()
                    await self._flush_history()
            except RedisError as exc:
                self._outage.failed(exc)
            await self._until(timeout=PROMOTE_INTERVAL)

    async def _flush_latency(self) -> None:
        samples, self._samples = self._samples, {q: [] for q in self._concurrency}
        if not any(samples.values()):
            return
        try:
            await self._broker.record_latency(samples)
        except RedisError as exc:
            # Measurements, not jobs: dropping them is fine.
            logger.debug("latency samples dropped: %s", exc)

    async def _flush_history(self) -> None:
        tally, self._tally = self._tally, {"done": 0, "failed": 0}
        try:
            await self._broker.record_history(tally["done"], tally["failed"])
        except RedisError as exc:
            logger.debug("history dropped: %s", exc)  # a measurement, like the samples

    @staticmethod
    async def _pause(event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    # --- stopping -----------------------------------------------------------------------

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = self._deadline or loop.time()
        forced = asyncio.create_task(self._force.wait())
        try:
            if self._in_flight:
                logger.info(
                    "stopping: waiting up to %.1f s for %d in-flight jobs",
                    max(0.0, deadline - loop.time()),
                    len(self._in_flight),
                )
            while self._in_flight and not self._force.is_set():
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
        # Past the deadline: one try (see _settle for what happens if it fails).
        mark = self._context.take_mark(delivery_id(job.raw))
        returning = functools.partial(self._broker.return_job, job.queue, job.raw, marker=mark)
        if await self._settle(f"on {job.queue}", returning):
            logger.info("queue %s: returned an unfinished job to the queue", job.queue)
            self._metrics.finished(_type_of(job.raw), "returned")

    async def _release(self) -> None:
        """Give up the lease; anything still held (a job whose return failed) goes back now."""
        try:
            returned, _ = await self._broker.release()
        except RedisError as exc:
            logger.warning("could not release the lease (%s); it expires by itself", exc)
            return
        if returned > 0:
            logger.info("returned %d held jobs to their queues", returned)
