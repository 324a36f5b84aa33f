"""The benchmark tools run and report what they measure (their figures are never asserted:
speed is what they measure, not what the suite checks)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from loadtest.bench.__main__ import Cores, pipeline_table, sizing_table, table
from tests.helpers import RedisServer
from tests.processes import ROOT


def _report(redis_server: RedisServer, tool: str, *args: str, heading: str) -> str:
    """Run ``python -m loadtest.bench.<tool>`` on the suite's Redis; its report after
    ``heading``."""
    done = subprocess.run(
        [sys.executable, "-m", f"loadtest.bench.{tool}", *args, "--redis-url", redis_server.url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.split(heading)[1]


def test_parts_reports_each_part_of_a_signup(redis_server: RedisServer) -> None:
    report = _report(
        redis_server, "parts", "--rounds", "1", "--requests", "320", heading="CPU per signup"
    )
    for level in ("bare", "app", "body", "valid", "signup", "own"):
        assert f"\n  {level} " in report, report


def test_redis_parts_reports_each_part_per_signup(redis_server: RedisServer) -> None:
    report = _report(
        redis_server, "redis_parts", "--rounds", "1", "--signups", "64",
        heading="Redis CPU per signup",
    )  # fmt: skip
    for part in ("commit   x1 ", "commit   x12 ", "commit   x32 ", "takes    x12 ",
                 "consumer x12 "):  # fmt: skip
        assert f"\n  {part}" in report, report


def _options() -> argparse.Namespace:
    return argparse.Namespace(
        threads=1, connections=32, duration=8.0, warmup=2.0, workers=1, rounds=2,
        jobs=100, concurrency=8, baseline=Path("/tmp/base"),
    )  # fmt: skip


def _row(cpu: float, rps: float = 1000.0) -> dict[str, float]:
    return {"rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "cpu_us": cpu, "redis_us": 10.0,
            "errors": 0, "rss_mb": 40.0}  # fmt: skip


def test_the_table_gives_the_own_cost_and_says_how_it_was_pinned() -> None:
    signup = {
        "bare": [_row(200), _row(220)],
        "service": [_row(300), _row(360)],
        "flask": [_row(400), _row(400)],
    }
    pinned = table(_options(), signup, {}, Cores({1}, {0}))
    assert "server pinned alone on core 1; wrk and Redis on core 0" in pinned
    service = next(line for line in pinned.splitlines() if line.startswith("| this service"))
    assert "| 330 | 120 |" in service  # median CPU 330, less the ceiling's 210
    assert "round by round (each round's service less the same round's ceiling): 100, 140" in (
        pinned
    )
    assert "one core: server, wrk and Redis share it" in table(
        _options(), signup, {}, Cores(None, None)
    )


def test_tracing_and_a_baseline_are_compared_with_the_service_round_by_round() -> None:
    signup = {
        "bare": [_row(200), _row(200)],
        "service": [_row(300), _row(310)],
        "baseline": [_row(297), _row(312)],
        "traced": [_row(500), _row(520)],
    }
    text = table(_options(), signup, {}, Cores({1}, {0}))
    assert "| this service as /tmp/base has it (baseline) |" in text
    assert (
        "CPU per request, service against baseline, round by round: +3.0 µs (+1.0%), "
        "-2.0 µs (-0.6%); median +0.5 µs (+0.2%)." in text
    )
    assert "CPU per request, traced against service, round by round: +200.0 µs" in text


def test_the_pipeline_table_gives_redis_per_signup_and_its_commands() -> None:
    rounds = [
        {"signups": 100, "rps": 1.0, "redis_us": 80.0, "reads": 2.0,
         "commands": {"evalsha": {"calls": 5.0, "us": 50.0}, "lpush": {"calls": 3.0, "us": 3.0}}},
        {"signups": 120, "rps": 1.0, "redis_us": 60.0, "reads": 3.0,
         "commands": {"evalsha": {"calls": 5.0, "us": 40.0}, "lpush": {"calls": 3.0, "us": 2.0}}},
    ]  # fmt: skip
    lines = pipeline_table(_options(), {"service": rounds})
    assert (
        "**70.0 µs of Redis CPU per signup** (rounds: 80.0, 60.0; 110 signups a round). "
        "Redis read 2.50 times per signup" in (lines[0])
    )
    assert "baseline" not in lines[0]
    assert lines[4:6] == ["| EVALSHA | 5.00 | 45.0 |", "| LPUSH | 3.00 | 2.5 |"]


def test_a_pipeline_baseline_is_compared_round_by_round_and_command_by_command() -> None:
    def row(redis_us: float, evalsha: float) -> dict[str, object]:
        return {"signups": 100, "rps": 1.0, "redis_us": redis_us, "reads": 1.0,
                "commands": {"evalsha": {"calls": evalsha, "us": 10.0 * evalsha}}}  # fmt: skip

    pipeline = {"service": [row(60.0, 3.0), row(90.0, 3.0)], "baseline": [row(80.0, 5.0),
                row(100.0, 5.0)]}  # fmt: skip
    lines = pipeline_table(_options(), pipeline)
    assert (
        "The baseline (/tmp/base), in alternating rounds: **90.0 µs** (rounds: 80.0, 100.0), "
        "read 1.00 times per signup; this one against it, round by round: -25%, -10%, "
        "median **-18%**." in lines[0]
    )
    assert lines[2].startswith("| command | calls per signup | µs per signup | calls per signup "
                               "(baseline) |")  # fmt: skip
    assert lines[4] == "| EVALSHA | 3.00 | 30.0 | 5.00 | 50.0 |"


def test_a_service_on_another_server_is_measured_against_the_bare_app_on_that_server() -> None:
    signup = {
        "bare": [_row(200, 3000), _row(200, 3000)],
        "service": [_row(300, 2000), _row(300, 2000)],
        "bare-uvicorn": [_row(100, 8000), _row(100, 8000)],
        "service-uvicorn": [_row(170, 4000), _row(170, 4000)],
        "flask": [_row(400, 2500), _row(400, 2500)],
    }
    lines = table(_options(), signup, {}, Cores({1}, {0})).splitlines()
    (uvicorn,) = [line for line in lines if line.startswith("| this service on uvicorn")]
    # 4,000 req/s: 0.50 of its own ceiling (8,000), 1.60x the peer; own cost 170 - 100.
    assert uvicorn.startswith("| this service on uvicorn | 4,000 | 0.50 | 1.60 |")
    assert "| 170 | 70 |" in uvicorn
    (hypercorn,) = [line for line in lines if line.startswith("| this service on hypercorn")]
    assert hypercorn.startswith("| this service on hypercorn | 2,000 | 0.67 | 0.80 |")


def test_the_sizing_model_comes_from_the_one_one_runs_and_is_checked_on_the_others() -> None:
    def run(rate: float, web: float, consumer: float) -> dict[str, float]:
        return {"rate": rate, "web_us": web, "consumer_us": consumer, "redis_us": 60.0}

    sizing = {
        "1 web, 1 consumer": [run(2000, 300, 200), run(2000, 300, 200)],
        "2 web, 2 consumer": [run(1800, 330, 220), run(1800, 330, 220)],
    }
    lines = sizing_table(_options(), sizing, Cores({1}, {0}))
    # 1e6 / (300 + 200) = 2,000 signups/s per core, in every configuration.
    assert "1e6 / 500 = **2,000 signups/s**" in lines[0]
    assert "| 2 web, 2 consumer | 1,800 | 2,000 | -10% | 330 | 220 | 60.0 |" in lines
    # At 70% busy: 0.7e6 / 300 per web worker, 0.7e6 / 200 per consumer, 0.7e6 / 60 per Redis.
    assert "one web worker carries 2,333 signups/s, one consumer process 3,500, and one " in (
        " ".join(lines)
    )


def test_the_dashboard_part_measures_each_read_on_a_filled_redis(
    redis_server: RedisServer,
) -> None:
    from loadtest.bench.dashboard import bench_dashboard

    found = bench_dashboard(redis_server.url)
    assert list(found) == [
        "overview, first refresh",
        "overview, next refreshes",
        "/stats (no history)",
        "a page of 25 dead letters",
    ]
    assert all(cost > 0 for cost in found.values()), found
    report = table(_options(), {}, {}, Cores({1}, {0}), dashboard=found)
    assert "| overview, next refreshes |" in report and "10,000 dead letters" in report
