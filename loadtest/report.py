"""What a run means: request figures, the pipeline's view from /stats, a JSON report and a
PNG chart."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from loadtest.client import Connection, HttpError, poll_stats
from loadtest.generator import Recording, backlog_row
from pipeline.keys import CORE_COUNTERS
from pipeline.queue import LATENCY_FLUSH_INTERVAL, LATENCY_SAMPLES
from pipeline.registry import Registry

#: Where ``/stats`` counts jobs not yet done: waiting, held by consumers, waiting for a retry.
UNDONE = ("queues", "processing", "delayed")
#: Above this share of one core, the generator may be what limits the rate.
CPU_WARNING = 0.9
#: An open loop whose achieved rate is below this share of the offered one fell behind.
KEPT_UP = 0.95


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of sorted values (None for none)."""
    if not sorted_values:
        return None
    return sorted_values[max(1, math.ceil(fraction * len(sorted_values))) - 1]


def summarise(recording: Recording, rate: float | None) -> dict[str, Any]:
    latencies = sorted(recording.latency)
    statuses = Counter("error" if s == 0 else str(s) for s in recording.status)
    ms = {
        name: None if (v := percentile(latencies, q)) is None else round(v * 1e3, 3)
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0))
    }
    failed = sum(n for code, n in statuses.items() if code == "error" or int(code) >= 500)
    answered = len(latencies) - statuses.get("error", 0)
    # The rate achieved: answers over the time they took, from the start of the measured phase
    # to the last answer (past the end when the server fell behind an open loop).
    seconds = max(recording.measured_seconds, max(recording.completed, default=0.0))
    achieved = round(answered / seconds, 1) if seconds else 0.0
    per_second: list[dict[str, Any]] = []
    buckets: dict[int, list[float]] = {}
    for done, latency in zip(recording.completed, recording.latency, strict=True):
        buckets.setdefault(int(done), []).append(latency)
    for second in sorted(buckets):
        if second + 1 > seconds:
            continue  # the last, partial second
        values = sorted(buckets[second])
        per_second.append(
            {
                "t": second,
                "requests": len(values),
                "p50_ms": round((percentile(values, 0.5) or 0) * 1e3, 3),
                "p99_ms": round((percentile(values, 0.99) or 0) * 1e3, 3),
            }
        )
    cpu_share = recording.cpu_seconds / recording.wall_seconds if recording.wall_seconds else 0
    open_loop = rate is not None
    not_sent = recording.scheduled - recording.sent if open_loop else None
    return {
        "mode": "closed loop" if rate is None else f"open loop at {rate:g} req/s",
        "requests": len(latencies),
        "answered": answered,
        "seconds": round(seconds, 3),
        "requests_per_second": achieved,
        "offered_per_second": rate,
        "fell_behind": open_loop
        and (achieved < KEPT_UP * (rate or 0) or bool(not_sent) or bool(recording.unfinished)),
        "latency_ms": ms,
        "status_codes": dict(sorted(statuses.items())),
        "errors": dict(recording.errors),
        "failed": failed,
        "scheduled": recording.scheduled if open_loop else None,
        "not_sent": not_sent,
        "unfinished": recording.unfinished if open_loop else None,
        "warmup_accepted": recording.accepted_warmup,
        "generator_cpu": round(cpu_share, 3),
        "per_second": per_second,
        "backlog": recording.backlog,
    }


def undone(stats: dict[str, Any]) -> int:
    """Jobs ``stats`` says are not done: waiting, held by a consumer, or waiting for a retry."""
    return sum(sum(stats.get(where, {}).values()) for where in UNDONE)


def effects(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """What the reactions' jobs did during the run: each counter ``/stats`` has beyond the
    pipeline's own (one per counting job type, whatever the server's REACTIONS), and the
    jobs dead-lettered."""
    grown = {
        name: value - before.get(name, 0)
        for name, value in after.items()
        if isinstance(value, int)
        and name not in CORE_COUNTERS
        and name not in ("dead_letter", "consumers")
    }
    grown["dead_lettered"] = after.get("dead_letter", 0) - before.get("dead_letter", 0)
    return grown


async def pipeline_view(
    host: str,
    port: int,
    before: dict[str, Any],
    accepted: int,
    load_seconds: float,
    timeout: float,
    backlog: list[dict[str, Any]],
    measured_seconds: float,
    registry: Registry,
) -> dict[str, Any]:
    """Wait until every job the accepted signups pushed is done: every one is written with
    its signup's 201, so once the load is over and ``/stats`` counts the signups, no job
    waiting, held or delayed means all of them ran (or were dead-lettered), however many
    each reaction pushed. Time it from the end of the load, and read what the jobs did and
    this run's queue waits (``registry``, the same ``REACTIONS`` as the service, says which
    counters' jobs travel on which queue). Meanwhile the queues' depths keep being added to
    ``backlog`` once a second, and once more when drained (its time axis goes on from
    ``measured_seconds``, the end of the load)."""
    connection = Connection(host, port)
    started = time.perf_counter()
    sampled = started - 1.0
    stats: dict[str, Any] = {}
    try:
        while True:
            if (answer := await poll_stats(connection)) is not None:
                stats = answer
                now = time.perf_counter()
                counted = stats.get("users", 0) - before.get("users", 0) >= accepted
                done = counted and undone(stats) == 0
                if done or now - sampled >= 1.0:
                    sampled = now
                    backlog.append(backlog_row(stats, measured_seconds + now - started))
                if done:
                    break
            if time.perf_counter() - started > timeout:
                return {
                    "drained": False,
                    "message": f"not every accepted signup was processed within {timeout:g} s",
                    "left": {where: stats.get(where, {}) for where in UNDONE},
                }
            await asyncio.sleep(0.1)
        after = time.perf_counter() - started
        # The consumers write their latency samples once a second: wait for the last jobs'.
        await asyncio.sleep(LATENCY_FLUSH_INTERVAL * 1.5)
        stats = await poll_stats(connection) or stats
    finally:
        connection.close()
    return {
        "drained": True,
        "signups": accepted,
        "seconds_after_load": round(after, 3),
        "processed_per_second": round(accepted / (load_seconds + after), 1),
        "effects": effects(before, stats),
        "queue_wait_ms": run_queue_waits(before, stats, registry),
    }


def run_queue_waits(
    before: dict[str, Any], after: dict[str, Any], registry: Registry
) -> dict[str, Any]:
    """Each queue's wait p50/p99 over this run's jobs. ``/stats`` gives percentiles over each
    queue's newest samples (at most LATENCY_SAMPLES), with no times: they are this run's only
    when the run finished at least as many jobs on the queue as there are samples. Otherwise
    the figures are None, with ``run_jobs`` and ``samples`` saying why."""
    run_jobs: Counter[str] = Counter()
    for job_type in registry.job_types.values():
        if job_type.counter is not None:
            counter = job_type.counter
            run_jobs[job_type.queue] += after.get(counter, 0) - before.get(counter, 0)
    waits: dict[str, Any] = {}
    for queue, latency in after.get("latency", {}).items():
        samples = latency["samples"]
        this_run = run_jobs[queue] >= samples
        waits[queue] = {
            "p50": latency["wait_ms"]["p50"] if this_run else None,
            "p99": latency["wait_ms"]["p99"] if this_run else None,
            "run_jobs": run_jobs[queue],
            "samples": samples,
        }
    return waits


async def read_stats(host: str, port: int) -> dict[str, Any]:
    connection = Connection(host, port)
    try:
        status, body = await connection.request("GET", "/stats")
    finally:
        connection.close()
    if status != 200:
        raise HttpError(f"GET /stats answered {status}")
    result: dict[str, Any] = orjson.loads(body)
    return result


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def render(summary: dict[str, Any]) -> str:
    """The final report, for a terminal."""
    ms = summary["latency_ms"]
    lines = [
        f"{summary['mode']}: {summary['requests']:,} requests, "
        f"{summary['requests_per_second']:,.1f} req/s achieved "
        f"({summary['answered']:,} answers over the {summary['seconds']:.1f} s they took; "
        "warmup excluded)",
        "latency ms: " + "  ".join(f"{name} {_fmt(value)}" for name, value in ms.items()),
        "status codes: "
        + ", ".join(f"{code} x{count:,}" for code, count in summary["status_codes"].items()),
    ]
    if summary["errors"]:
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in summary["errors"].items()))
    if "429" in summary["status_codes"]:
        lines.append(
            "429: the service's rate limit per client address (RATE_LIMIT) refused signups; "
            "load-test a service started with RATE_LIMIT=off"
        )
    if summary.get("fell_behind"):
        lines.append(
            f"the server fell behind: {summary['requests_per_second']:,.1f} of the offered "
            f"{summary['offered_per_second']:,g} req/s achieved; of {summary['scheduled']:,} "
            f"requests scheduled, {summary['not_sent']:,} not sent and "
            f"{summary['unfinished']:,} not answered when the run ended"
        )
    pipeline = summary.get("pipeline")
    if pipeline:
        if pipeline["drained"]:
            lines += [
                f"pipeline: all {pipeline['signups']:,} accepted signups "
                f"({summary['warmup_accepted']:,} of them in the warmup) processed "
                f"{pipeline['seconds_after_load']:.2f} s after the load ended; "
                f"{pipeline['processed_per_second']:,.1f} signups/s end to end, warmup included",
                "jobs' effects: "
                + ", ".join(f"{name} {n:,}" for name, n in pipeline["effects"].items()),
                *_waits(pipeline["queue_wait_ms"]),
            ]
        else:
            lines.append(f"pipeline: {pipeline['message']}; left {pipeline['left']}")
    cpu = summary["generator_cpu"]
    lines.append(f"generator CPU: {cpu:.0%} of one core")
    if cpu >= CPU_WARNING:
        lines.append(
            "WARNING: the generator used most of a core; it, not the server, may be the limit "
            "(run it on another machine, or compare with wrk)"
        )
    return "\n".join(lines)


def _waits(waits: dict[str, dict[str, Any]]) -> list[str]:
    """The queue waits' lines: this run's figures, and the queues it cannot tell apart."""
    lines = []
    known = {q: w for q, w in waits.items() if w["p50"] is not None}
    if known:
        figures = ", ".join(f"{q} {_fmt(w['p50'])}/{_fmt(w['p99'])}" for q, w in known.items())
        lines.append(f"queue wait p50/p99 ms, this run's jobs: {figures}")
    mixed = {q: w for q, w in waits.items() if q not in known}
    if mixed:
        jobs = ", ".join(f"{q} {w['run_jobs']:,} of {w['samples']:,}" for q, w in mixed.items())
        lines.append(
            f"queue wait: not this run's alone ({jobs} samples are this run's; /stats keeps "
            f"each queue's newest {LATENCY_SAMPLES:,}, without times): not reported"
        )
    return lines


def write_json(summary: dict[str, Any], path: Path) -> None:
    path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))


def write_chart(summary: dict[str, Any], path: Path) -> None:
    """Throughput, latency percentiles and queue depth over time, as a PNG."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    seconds = [row["t"] for row in summary["per_second"]]
    figure, (rate, latency, depth) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    rate.plot(seconds, [row["requests"] for row in summary["per_second"]], color="tab:blue")
    rate.set_ylabel("requests/s")
    rate.set_ylim(bottom=0)
    rate.set_title(f"POST /signup, {summary['mode']}")
    latency.plot(seconds, [row["p50_ms"] for row in summary["per_second"]], label="p50")
    latency.plot(seconds, [row["p99_ms"] for row in summary["per_second"]], label="p99")
    latency.set_ylabel("latency ms")
    latency.set_ylim(bottom=0)
    latency.legend()
    backlog = summary["backlog"]
    for queue in sorted({q for row in backlog for q in row["queues"]}):
        depth.plot(
            [row["t"] for row in backlog],
            [row["queues"].get(queue, 0) + row["processing"].get(queue, 0) for row in backlog],
            label=queue,
        )
    depth.set_ylabel("jobs queued + held")
    depth.set_xlabel("seconds from the end of the warmup (before 0: the warmup)")
    if backlog:
        depth.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
