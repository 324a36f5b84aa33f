"""The web app's Prometheus metrics and ``GET /metrics``.

Counters and histograms are kept per hypercorn worker and summed across the workers by
prometheus_client's multiprocess mode (``service`` turns it on, see
:func:`service.multiprocess.use_multiprocess_dir`); the queue gauges are read from Redis per
scrape (:class:`QueueCollector`: the same for every scraper, whatever serves it).
Recording a request costs two label lookups in a dict and three increments: no Redis call.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from quart import Blueprint, Response, current_app
from quart_schema import hide
from redis.exceptions import RedisError

from pipeline.stats import PipelineStats, dead_by_queue, read_stats
from service.deps import deps, operators_only

EXTENSION = "signup_metrics"
#: Buckets (seconds) of the web's request latency: a signup takes milliseconds.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SIGNUP_ROUTE = ("POST", "/signup")
OUTCOMES = ("created", "conflict", "invalid", "rate_limited", "unavailable", "error")


def signup_outcome(status: int) -> str:
    """What a ``POST /signup`` answered, as the ``outcome`` label."""
    if status == 201:
        return "created"
    if status == 409:
        return "conflict"
    if status == 429:
        return "rate_limited"
    if status == 503:
        return "unavailable"
    if 400 <= status < 500:
        return "invalid"
    return "error"


class WebMetrics:
    """The web app's metrics, in their own registry (one per app, so tests start at zero)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "signup_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "signup_http_request_duration_seconds",
            "Time from a request's arrival at the app to its last byte sent, by route.",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.signups = Counter(
            "signup_signups",
            "POST /signup answers by outcome: created, conflict, invalid, unavailable, error.",
            ["outcome"],
            registry=self.registry,
        )
        self.receiver_errors = Counter(
            "signup_receiver_errors",
            "Receivers of user-signed-up that raised (the signup went on without them).",
            ["receiver"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.signups.labels(outcome)
        self._requests: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._outcomes: dict[int, Counter] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one answered request (the middleware calls this)."""
        key = (route, method, status)
        children = self._requests.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.duration.labels(route),
            )
            self._requests[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if (method, route) == SIGNUP_ROUTE:
            outcome = self._outcomes.get(status)
            if outcome is None:
                outcome = self._outcomes[status] = self.signups.labels(signup_outcome(status))
            outcome.inc()

    def collectors(self) -> list[Collector]:
        """What a scrape reports of this app: every worker's counts in multiprocess mode,
        else this process's."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            merged = CollectorRegistry(auto_describe=True)
            WorkersCollector(merged, directory)  # type: ignore[no-untyped-call]
            return [merged]
        return [self.registry]


class WorkersCollector(MultiProcessCollector):
    """Every worker's counts, from the files of the multiprocess directory. A worker creates
    its file empty and sizes it a moment later (prometheus_client's ``MmapedDict``), and
    prometheus_client fails the whole scrape on a file read in between (a 500 from
    ``/metrics`` as a worker records its first request: prometheus/client_python#1199).
    A file with no header yet holds no counts, so it is left out."""

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(FileNotFoundError):  # a dead worker's, just removed
                if os.path.getsize(path) >= _HEADER_BYTES:
                    files.append(path)
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call, no-any-return]


#: What a metrics file holds before its first count: its used size and padding (8 bytes).
_HEADER_BYTES = 8


def web_metrics() -> WebMetrics:
    """The current app's metrics."""
    found: WebMetrics = current_app.extensions[EXTENSION]
    return found


class _Combined(Collector):
    def __init__(self, parts: list[Collector], redis_up: bool) -> None:
        self._parts = parts
        self._redis_up = redis_up

    def collect(self) -> Iterable[Metric]:
        for part in self._parts:
            yield from part.collect()
        yield GaugeMetricFamily(
            "signup_redis_up",
            "Whether this scrape could read the queues' state from Redis.",
            value=int(self._redis_up),
        )


metrics_api = Blueprint("metrics", __name__)


@metrics_api.get("/metrics")
@hide  # Prometheus text, not JSON: described in the docs (Operating it), left out of /openapi.json.
async def metrics() -> Response:
    """Prometheus text format: the app's counters and histograms, and the queues' gauges
    (left out, with ``signup_redis_up 0``, when Redis cannot be read). For clients
    ``OPS_ALLOW`` lets in; others get a 404."""
    operators_only()
    parts = web_metrics().collectors()
    current = deps()
    try:
        stats = await read_stats(current.redis, current.keys, current.registry)
        split = await dead_by_queue(
            current.redis, current.keys, stats.dead_letter, current.registry.queues
        )
    except RedisError as exc:  # the gauges are left out; signup_redis_up 0 says why
        current.outage.failed(exc)
        redis_up = False
    else:
        current.outage.ok()
        parts.append(QueueCollector(stats, split))
        redis_up = True
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Combined(parts, redis_up))
    return Response(generate_latest(registry), status=200, content_type=CONTENT_TYPE_LATEST)


class QueueCollector(Collector):
    """The queues' gauges from one :func:`pipeline.stats.read_stats` snapshot (its queues
    are the registry's) and the dead letters split by queue."""

    def __init__(self, stats: PipelineStats, dead_by_queue: Mapping[str, int]) -> None:
        self._stats = stats
        self._dead_by_queue = dead_by_queue

    def collect(self) -> Iterable[Metric]:
        stats = self._stats
        for name, counts, text in (
            ("signup_queue_depth", stats.queues, "Jobs waiting in each queue."),
            ("signup_queue_processing", stats.processing, "Jobs held by consumers, per queue."),
            ("signup_queue_delayed", stats.delayed, "Jobs waiting to be retried, per queue."),
        ):
            family = GaugeMetricFamily(name, text, labels=["queue"])
            for queue, count in counts.items():
                family.add_metric([queue], count)
            yield family
        dead = GaugeMetricFamily(
            "signup_dead_letters", "Dead letters, per queue they came from.", labels=["queue"]
        )
        for queue, count in self._dead_by_queue.items():
            dead.add_metric([queue], count)
        yield dead
        yield GaugeMetricFamily(
            "signup_consumers_live", "Consumers holding a live lease.", value=len(stats.consumers)
        )
