"""The load: unique signups over keep-alive connections, closed or open loop, recorded.

Closed loop: ``concurrency`` connections, each sending its next request when the last one is
answered. Open loop: requests are scheduled at a fixed ``rate`` whatever the server does, and
each one's latency counts from its scheduled send time. A stalled server then shows as
latency (the requests wait for a free connection), not as fewer requests: no coordinated
omission.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
import uuid
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from loadtest.client import Connection, HttpError, poll_stats

#: How often the open loop's scheduler wakes to queue the requests that fell due.
SCHEDULER_TICK = 0.001


@dataclass
class Plan:
    """What to run."""

    host: str
    port: int
    duration: float
    warmup: float
    connections: int
    rate: float | None = None  # None: closed loop
    progress: bool = True


@dataclass
class Recording:
    """Every measured request (after the warmup): when it completed (s since the measured
    phase began), its latency (s), its status (0: a connection error)."""

    completed: array[float] = field(default_factory=lambda: array("d"))
    latency: array[float] = field(default_factory=lambda: array("d"))
    status: array[int] = field(default_factory=lambda: array("i"))
    errors: Counter[str] = field(default_factory=Counter)
    accepted_total: int = 0  # 201s including the warmup: the signups the pipeline must process
    accepted_warmup: int = 0  # of which in the warmup
    scheduled: int = 0  # open loop: requests scheduled in the measured phase
    sent: int = 0  # requests of the measured phase that went out
    unfinished: int = 0  # open loop: sent but not answered when the run ended
    measured_seconds: float = 0.0
    cpu_seconds: float = 0.0  # the generator's CPU over the whole run, warmup included
    wall_seconds: float = 0.0  # the whole run, warmup included
    backlog: list[dict[str, Any]] = field(default_factory=list)  # per second, from /stats


def backlog_row(stats: dict[str, Any], t: float) -> dict[str, Any]:
    """One sample of the backlog over time: the queues' depths and the jobs held, at ``t``
    seconds from the start of the measured phase."""
    return {
        "t": round(t, 3),
        "queues": stats.get("queues", {}),
        "processing": stats.get("processing", {}),
    }


class _Signups:
    """Unique signup bodies: a run id and a counter."""

    def __init__(self) -> None:
        self._run = uuid.uuid4().hex[:8]
        self._next = 0

    def body(self) -> bytes:
        self._next += 1
        name = f"lt_{self._run}_{self._next}"
        return orjson.dumps({"username": name, "email": f"{name}@example.com"})


class LoadRun:
    """Runs one plan and records it. Every time is ``time.perf_counter()``: under uvloop the
    loop's clock has millisecond resolution."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.recording = Recording()
        self._signups = _Signups()
        self._measuring_from = 0.0
        self._end = 0.0
        #: Every answer's latency and status, warmup included, for the live line to take.
        self._live: list[tuple[float, int]] = []

    async def run(self) -> Recording:
        start = time.perf_counter()
        self._measuring_from = start + self.plan.warmup
        self._end = self._measuring_from + self.plan.duration
        cpu = time.process_time()
        watchers = [asyncio.create_task(self._watch_backlog())]
        if self.plan.progress:
            watchers.append(asyncio.create_task(self._progress()))
        try:
            if self.plan.rate is None:
                await asyncio.gather(
                    *(
                        self._closed(Connection(self.plan.host, self.plan.port))
                        for _ in range(self.plan.connections)
                    )
                )
            else:
                await self._open(self.plan.rate)
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        self.recording.measured_seconds = self.plan.duration
        self.recording.cpu_seconds = time.process_time() - cpu
        self.recording.wall_seconds = time.perf_counter() - start
        if self.plan.progress:
            sys.stderr.write("\n")
        return self.recording

    async def _send(self, connection: Connection, began: float) -> None:
        """One signup; recorded if ``began`` (its send or scheduled time) is in the measured
        phase."""
        measured = began >= self._measuring_from
        if measured:
            self.recording.sent += 1
        try:
            status, _ = await connection.request("POST", "/signup", self._signups.body())
            error = None
        except HttpError as exc:
            status, error = 0, str(exc).split(":", 1)[0]
        done = time.perf_counter()
        if self.plan.progress:
            self._live.append((done - began, status))
        if status == 201:
            self.recording.accepted_total += 1
            self.recording.accepted_warmup += not measured
        if not measured:
            return
        self.recording.completed.append(done - self._measuring_from)
        self.recording.latency.append(done - began)
        self.recording.status.append(status)
        if error is not None:
            self.recording.errors[error] += 1

    async def _closed(self, connection: Connection) -> None:
        try:
            while (now := time.perf_counter()) < self._end:
                await self._send(connection, now)
        finally:
            connection.close()

    async def _open(self, rate: float) -> None:
        due: asyncio.Queue[float | None] = asyncio.Queue()

        async def worker() -> None:
            connection = Connection(self.plan.host, self.plan.port)
            try:
                while (scheduled := await due.get()) is not None:
                    await self._send(connection, scheduled)
            finally:
                connection.close()

        workers = [asyncio.create_task(worker()) for _ in range(self.plan.connections)]
        start = time.perf_counter()
        # Request i is due at start + i / rate, for every such time before the end.
        total = math.ceil((self._end - start) * rate)
        queued = 0

        def queue_due(owed: int) -> int:
            for index in range(queued, owed):
                scheduled = start + index / rate
                if scheduled >= self._measuring_from:
                    self.recording.scheduled += 1
                due.put_nowait(scheduled)
            return max(queued, owed)

        while (now := time.perf_counter()) < self._end:
            queued = queue_due(min(total, math.floor((now - start) * rate) + 1))
            await asyncio.sleep(SCHEDULER_TICK)
        queued = queue_due(total)  # any the last tick overslept
        # The schedule is over; answers still owed get a bounded wait, then count as unfinished.
        for _ in workers:
            due.put_nowait(None)
        _, pending = await asyncio.wait(workers, timeout=10)
        for task in pending:
            task.cancel()
        self.recording.unfinished = self.recording.sent - len(self.recording.latency)

    async def _watch_backlog(self) -> None:
        """Once a second: the queues' depths, from the service's /stats."""
        connection = Connection(self.plan.host, self.plan.port)
        try:
            while True:
                stats = await poll_stats(connection)
                if stats is not None:
                    t = time.perf_counter() - self._measuring_from
                    self.recording.backlog.append(backlog_row(stats, t))
                await asyncio.sleep(1.0)
        finally:
            connection.close()

    async def _progress(self) -> None:
        """A live line on stderr, every second: rate, p50/p99 and errors of the last second
        (in the warmup too, labelled so; the report counts only the measured phase)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            answers, self._live = self._live, []
            latencies = sorted(latency for latency, _ in answers)
            errors = sum(1 for _, s in answers if s == 0 or s >= 500)
            # The line is about the second just past: warmup if most of it was.
            phase = (
                "warmup"
                if now - 0.5 < self._measuring_from
                else f"{now - self._measuring_from:5.1f} s"
            )
            p50 = latencies[len(latencies) // 2] * 1e3 if latencies else 0.0
            p99 = latencies[int(len(latencies) * 0.99)] * 1e3 if latencies else 0.0
            sys.stderr.write(
                f"\r{phase:>8}  {len(latencies):>7,} req/s  p50 {p50:7.2f} ms  "
                f"p99 {p99:7.2f} ms  errors {errors:>5}   "
            )
            sys.stderr.flush()
