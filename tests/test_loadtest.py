"""The load tester against the real service: closed and open loop, the report, the pipeline
view, the JSON and the chart; and its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from devtools.embedded_redis import free_port
from loadtest.generator import Recording
from loadtest.report import render, summarise
from tests.helpers import REGISTRY, RedisServer, SmtpSink
from tests.processes import ROOT, child_env, consumer_argv, http, web


def loadtest(
    *args: str, timeout: float = 60, quiet: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *(["--quiet"] if quiet else []), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def locust(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_closed_loop_reports_requests_and_the_pipeline(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, tmp_path: Path
) -> None:
    env = child_env(redis_server, LOG_LEVEL="WARNING")
    async with web(spawn, env) as (port, _):
        spawn(consumer_argv(), env)
        report, chart = tmp_path / "report.json", tmp_path / "chart.png"
        result = loadtest(
            f"--url=http://127.0.0.1:{port}",
            "--concurrency=4",
            "--duration=2",
            "--warmup=0.5",
            f"--json={report}",
            f"--chart={chart}",
        )
        assert result.returncode == 0, result.stderr
        summary = orjson.loads(report.read_bytes())
        assert summary["requests"] > 0
        assert summary["status_codes"] == {"201": summary["requests"]}
        assert summary["failed"] == 0
        ms = summary["latency_ms"]
        assert 0 < ms["p50"] <= ms["p90"] <= ms["p99"] <= ms["p99.9"] <= ms["max"]
        pipeline = summary["pipeline"]
        assert pipeline["drained"] is True
        users = (await http(port, "GET", "/stats"))[1]["users"]
        assert pipeline["signups"] == users  # the warmup's signups too, and labelled so:
        assert summary["warmup_accepted"] > 0
        assert pipeline["signups"] == summary["requests"] + summary["warmup_accepted"]
        assert f"({summary['warmup_accepted']:,} of them in the warmup)" in result.stdout
        # A fresh Redis: every latency sample is this run's, so its waits are reported.
        waits = pipeline["queue_wait_ms"]
        assert set(waits) == set(REGISTRY.queues)
        assert all(w["p50"] is not None and w["run_jobs"] >= w["samples"] for w in waits.values())
        assert summary["backlog"], "queue depths sampled"
        assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert "201 x" in result.stdout
        assert "accepted signups (" in result.stdout

        # A second, small run: its few jobs are among the first run's samples, so the queue
        # waits /stats gives are not this run's, and the report says so instead of quoting them.
        result = loadtest(
            f"--url=http://127.0.0.1:{port}", "--rate=5", "--duration=1", "--warmup=0",
            f"--json={report}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        second = orjson.loads(report.read_bytes())["pipeline"]["queue_wait_ms"]
        assert all(w["p50"] is None and w["p99"] is None for w in second.values()), second
        assert all(w["run_jobs"] == 5 for w in second.values())
        assert "queue wait: not this run's alone (email 5 of " in result.stdout


async def test_a_reaction_that_pushes_for_some_signups_only_is_counted_as_it_pushed(
    spawn: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    # About half the signups get a note: the run still drains, and says what the jobs did.
    env = child_env(
        redis_server, LOG_LEVEL="WARNING", REACTIONS="reactions,tests.reactions.sometimes"
    )
    async with web(spawn, env) as (port, _):
        spawn(consumer_argv(), env)
        report = tmp_path / "report.json"
        result = loadtest(
            f"--url=http://127.0.0.1:{port}", "--concurrency=2", "--duration=1", "--warmup=0",
            f"--json={report}", env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        pipeline = orjson.loads(report.read_bytes())["pipeline"]
        _, stats = await http(port, "GET", "/stats")
    assert pipeline["drained"] is True, pipeline
    signups = pipeline["signups"]
    assert pipeline["effects"]["emails_sent"] == signups
    assert 0 < pipeline["effects"]["notes_made"] == stats["notes_made"] < signups
    assert pipeline["effects"]["dead_lettered"] == 0
    assert set(pipeline["queue_wait_ms"]) == {*REGISTRY.queues, "notes"}
    assert f"notes_made {stats['notes_made']:,}" in result.stdout


async def test_open_loop_sends_on_schedule_whatever_the_server_does(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, tmp_path: Path
) -> None:
    env = child_env(redis_server, LOG_LEVEL="WARNING")
    async with web(spawn, env) as (port, _):
        report = tmp_path / "report.json"
        result = loadtest(
            f"--url=http://127.0.0.1:{port}",
            "--rate=50",
            "--duration=2",
            "--warmup=0",
            "--no-pipeline",
            f"--json={report}",
        )
        assert result.returncode == 0, result.stderr
        summary = orjson.loads(report.read_bytes())
        assert summary["mode"] == "open loop at 50 req/s"
        assert summary["scheduled"] == 100
        assert (summary["requests"], summary["unfinished"]) == (100, 0)
        assert summary["status_codes"] == {"201": 100}
        assert "pipeline" not in summary


async def test_an_open_loop_the_server_cannot_keep_up_with_reports_what_was_achieved(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """5,000 req/s offered over one connection, which answers one request at a time: the
    report gives the rate achieved (answers over the time they took), not the offered one,
    and says that the server fell behind."""
    env = child_env(redis_server, LOG_LEVEL="WARNING")
    async with web(spawn, env) as (port, _):
        report = tmp_path / "report.json"
        result = loadtest(
            f"--url=http://127.0.0.1:{port}", "--rate=5000", "--connections=1",
            "--duration=0.5", "--warmup=0", "--no-pipeline", f"--json={report}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        summary = orjson.loads(report.read_bytes())
    assert summary["scheduled"] == 2500
    assert summary["offered_per_second"] == 5000
    assert summary["seconds"] > 0.5  # the answers took longer than the schedule
    achieved = summary["answered"] / summary["seconds"]
    assert summary["requests_per_second"] == pytest.approx(achieved, rel=1e-3)
    assert summary["requests_per_second"] < 0.95 * 5000
    assert summary["fell_behind"] is True
    assert summary["not_sent"] + summary["unfinished"] + summary["requests"] == 2500
    assert f"{summary['requests_per_second']:,.1f} req/s achieved" in result.stdout
    assert "the server fell behind" in result.stdout


async def test_the_backlog_is_sampled_until_drained_and_the_warmup_is_labelled_live(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, smtp_server: SmtpSink,
    tmp_path: Path,
) -> None:  # fmt: skip
    """One email at a time, each taking 50 ms, behind 40 signups a second: the queue is still
    draining when the load ends. The chart's last sample is the drained one, at the moment
    the report says everything was processed. The live line shows the warmup's rate."""
    smtp_server.delay = 0.05  # a slow mail server
    env = child_env(redis_server, LOG_LEVEL="WARNING", SMTP_URL=smtp_server.url)
    async with web(spawn, env) as (port, _):
        spawn(consumer_argv("--concurrency", "email=1"), env)
        report = tmp_path / "report.json"
        result = loadtest(
            f"--url=http://127.0.0.1:{port}", "--rate=40", "--duration=1", "--warmup=1.5",
            f"--json={report}", quiet=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        summary = orjson.loads(report.read_bytes())
    pipeline = summary["pipeline"]
    assert pipeline["seconds_after_load"] > 1.0  # the emails were still going out
    last = summary["backlog"][-1]
    assert last["t"] == pytest.approx(1.0 + pipeline["seconds_after_load"], abs=0.25)
    assert set(last["queues"].values()) == {0}
    assert set(last["processing"].values()) == {0}
    assert max(row["queues"]["email"] for row in summary["backlog"]) > 0
    live = [line.split() for line in result.stderr.split("\r") if line.strip()]
    warmup = [line for line in live if line[0] == "warmup"]
    assert warmup and int(warmup[0][1].replace(",", "")) > 0, result.stderr


def test_latency_counts_from_the_scheduled_time_and_cpu_is_reported() -> None:
    recording = Recording(
        completed=array("d", [0.1 * i for i in range(1, 11)]),
        latency=array("d", [0.001 * i for i in range(1, 11)]),
        status=array("i", [201] * 8 + [503, 0]),
        errors=Counter({"ConnectionResetError": 1}),
        measured_seconds=1.0,
        cpu_seconds=0.95,
        wall_seconds=1.0,
    )
    summary = summarise(recording, rate=None)
    assert summary["latency_ms"] == {
        "p50": 5.0,
        "p90": 9.0,
        "p99": 10.0,
        "p99.9": 10.0,
        "max": 10.0,
    }
    assert summary["status_codes"] == {"201": 8, "503": 1, "error": 1}
    assert summary["failed"] == 2
    text = render(summary)
    assert "generator CPU: 95% of one core" in text
    assert "WARNING: the generator used most of a core" in text
    assert "RATE_LIMIT" not in text
    summary["status_codes"]["429"] = 3
    assert "load-test a service started with RATE_LIMIT=off" in render(summary)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "0"], "'0': expected more than 0"),
        (["--url", "ftp://host"], "expected http://host[:port]"),
        (["--concurrency", "4", "--rate", "5"], "not allowed with argument"),
        (["--duration", "soon"], "'soon': expected a number"),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], message: str) -> None:
    result = loadtest(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_an_unreachable_service_is_one_line() -> None:
    result = loadtest(f"--url=http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot reach the service" in result.stderr


async def test_the_locustfile_signs_up_users_headless(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, tmp_path: Path
) -> None:
    env = child_env(redis_server, LOG_LEVEL="WARNING")
    async with web(spawn, env) as (port, _):
        result = locust(
            "--headless",
            "--users=4",
            "--spawn-rate=4",
            "--run-time=2s",
            f"--host=http://127.0.0.1:{port}",
            "--json",  # the final stats on stdout (its CSV can miss the last second)
        )
        assert result.returncode == 0, result.stderr[-2000:]  # locust exits 1 on any failure
        [signup] = [
            entry for entry in orjson.loads(result.stdout) if entry["name"] == "POST /signup"
        ]
        requests, failures = signup["num_requests"], signup["num_failures"]
        assert requests > 0
        assert failures == 0
        # Locust stops its 4 users mid-request: up to 4 signups the server made go unrecorded.
        users = (await http(port, "GET", "/stats"))[1]["users"]
        assert requests <= users <= requests + 4
