"""Prometheus metrics both processes share: the queues' state read from Redis at scrape time,
and the set-up of prometheus_client's multiprocess mode for hypercorn's workers.

Where each metric comes from (the README's "Metrics" section lists them all):
- queue gauges (``signup_queue_*``, ``signup_dead_letters``, ``signup_consumers_live``) are
  read from Redis when ``/metrics`` is scraped: the same for every scraper, whatever serves it;
- the web app's counters and histograms live in each hypercorn worker and are summed across
  the workers of one server by prometheus_client's multiprocess mode (one directory of
  memory-mapped files per hypercorn master, see :func:`use_multiprocess_dir`);
- each consumer process counts its own jobs and serves them on ``--metrics-port``: one target
  per process, summed by Prometheus.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from prometheus_client import values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.stats import PipelineStats

#: Buckets (seconds) of the web's request latency: a signup takes milliseconds.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Buckets (seconds) of a job's run time and queue wait: from a no-op to a slow SMTP server.
JOB_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


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


def is_spawned_worker() -> bool:
    """Whether multiprocessing started this process (as hypercorn starts its workers)."""
    return multiprocessing.parent_process() is not None


def use_multiprocess_dir(base: str) -> str:
    """Switch prometheus_client to multiprocess mode in a directory shared by the workers of
    this process's hypercorn master, and return it. Call before creating any metric.

    The directory is named for the master's pid and start time, so a restarted server starts
    from zero rather than adding to a previous run's counts; directories left by masters that
    are gone are removed. (Counts of a worker that died stay in the sum, as they should.)"""
    owner = _master_identity()
    root = Path(base)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("web-*"):
        if stale.name != f"web-{owner}" and not _alive(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    directory = root / f"web-{owner}"
    directory.mkdir(exist_ok=True)
    # prometheus_client reads the directory from the environment when it opens its files.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return str(directory)


def _master_identity() -> str:
    """``<pid>-<start time>`` of hypercorn's master (our parent) when hypercorn spawned us as
    a worker, else of this process."""
    pid = os.getppid() if is_spawned_worker() else os.getpid()
    return f"{pid}-{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "0"
    # Field 22, after the parenthesised command name (which may itself hold spaces).
    return stat.rpartition(")")[2].split()[19]


def _alive(name: str) -> bool:
    pid_text, _, started = name.removeprefix("web-").partition("-")
    with contextlib.suppress(ValueError):
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return _start_time(pid) == started
    return False
