"""A consumer process's Prometheus metrics, served on ``--metrics-port`` (``METRICS_PORT``).

Each consumer process counts its own jobs: one scrape target per process, summed by
Prometheus (``sum by (type, outcome) (rate(signup_jobs_total[1m]))``). The queues' depths are
on the web app's ``/metrics``, read from Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from pipeline.registry import Registry

logger = logging.getLogger(__name__)

#: Buckets (seconds) of a job's run time and queue wait: from a no-op to a slow SMTP server.
JOB_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
JOB_OUTCOMES = ("succeeded", "retried", "dead_lettered", "returned")
UNKNOWN = "unknown"
#: Seconds a scraper gets to send its request before the connection is closed.
REQUEST_TIMEOUT = 5.0


class ConsumerMetrics:
    """The metrics of one consumer process, in their own registry; the job types and queues
    labelled are those of ``reactions``."""

    def __init__(self, reactions: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter(
            "signup_jobs",
            "Jobs finished by this consumer, by type and outcome: succeeded, retried (failed, "
            "to be tried again), dead_lettered, returned (to their queue, untried: shutdown or "
            "Redis unavailable).",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "signup_job_run_seconds",
            "Time a job's handler ran, by type, whatever its outcome.",
            ["type"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "signup_job_queue_wait_seconds",
            "Time from a job's enqueueing (or its retry falling due) to its start, by queue.",
            ["queue"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.recovered = Counter(
            "signup_jobs_recovered",
            "Jobs this consumer took back from consumers whose lease expired: returned to "
            "their queue, or dead_lettered after too many deliveries.",
            ["outcome"],
            registry=self.registry,
        )
        # Every series exists from the start (so rate() sees the first increment), and the
        # hot path looks its child up in a dict rather than through labels().
        for outcome in ("returned", "dead_lettered"):
            self.recovered.labels(outcome)
        self._jobs = {
            (job_type, outcome): self.jobs.labels(job_type, outcome)
            for job_type in (*reactions.job_types, UNKNOWN)
            for outcome in JOB_OUTCOMES
        }
        self._run = {t: self.run_seconds.labels(t) for t in (*reactions.job_types, UNKNOWN)}
        self._wait = {q: self.queue_wait.labels(q) for q in reactions.queues}

    def finished(self, job_type: str | None, outcome: str) -> None:
        """Count one job's outcome (an unknown or missing type counts as ``unknown``)."""
        known = job_type if job_type in self._run else UNKNOWN
        self._jobs[known, outcome].inc()

    def ran(self, job_type: str, seconds: float) -> None:
        self._run.get(job_type, self._run[UNKNOWN]).observe(seconds)

    def waited(self, queue: str, seconds: float) -> None:
        self._wait[queue].observe(seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


async def serve_metrics(metrics: ConsumerMetrics, port: int) -> asyncio.Server:
    """Serve ``GET /metrics`` on ``port`` (all interfaces) until the server is closed."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request_line.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, metrics.exposition()
            else:
                status, content_type, body = "404 Not Found", "text/plain", b"GET /metrics\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(answer, port=port, reuse_address=True)
    logger.info("metrics on port %d (GET /metrics)", port)
    return server
