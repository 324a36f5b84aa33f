"""What an operator wires up: health checks, the consumers' ``check`` command, metrics, logs."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import values
from quart.typing import TestClientProtocol as QuartClient

from devtools.embedded_redis import free_port
from pipeline import logs
from pipeline.jobs import decode
from pipeline.keys import Keys
from pipeline.logs import JsonFormatter, TextFormatter
from pipeline.plan import resolve
from pipeline.settings import Settings
from service.app import create_app
from service.metrics import WorkersCollector
from service.middleware import AccessLine, AccessLines
from service.multiprocess import use_multiprocess_dir
from tests.helpers import RedisServer, Samples, eventually, parse_metrics, scrape
from tests.processes import (
    ROOT,
    Child,
    admin,
    child_env,
    consumer_argv,
    http,
    push_emails,
    request,
    web,
)

Spawn = Callable[[list[str], dict[str, str]], Child]


# --- health -------------------------------------------------------------------------------


async def test_healthz_answers_without_redis(make_settings: Callable[..., Settings]) -> None:
    app = create_app(resolve(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")))
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/healthz")
        assert response.status_code == 200
        assert await response.get_json() == {"status": "ok"}


async def test_readyz_is_200_when_redis_answers(client: QuartClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert await response.get_json() == {"status": "ready"}


async def test_readyz_is_503_with_the_reason_when_redis_is_unreachable(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(resolve(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")))
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/readyz")
        assert response.status_code == 503
        body = await response.get_json()
        assert body["error"] == "not_ready"
        assert body["message"].startswith("Redis did not answer PING")


async def test_readyz_is_503_when_redis_does_not_answer_within_a_second(
    client: QuartClient, redis: aioredis.Redis
) -> None:
    # CLIENT PAUSE holds every command (PING included) of other clients for 3 s.
    await redis.execute_command("CLIENT", "PAUSE", 3000, "ALL")
    try:
        response = await client.get("/readyz")
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
    assert response.status_code == 503
    body = await response.get_json()
    assert body["message"] in {
        "Redis did not answer PING within 1 s",
        "Redis did not answer PING: Timeout reading from socket",
    }


# --- python -m consumers check --------------------------------------------------------------


def test_check_fails_when_no_consumer_is_registered(redis_server: RedisServer) -> None:
    result = admin(redis_server, "check")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "python -m consumers: error: no consumer holds a live lease (none registered)"
    ]


async def test_check_follows_a_consumers_lease(
    spawn: Spawn, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys
) -> None:
    env = child_env(redis_server, LEASE_TTL="1")
    consumer = spawn(consumer_argv(), env)
    await eventually(lambda: "consuming" in consumer.output(), what="the consumer to start")
    await eventually(
        lambda: admin(redis_server, "check").returncode == 0, what="check to see the consumer"
    )
    assert admin(redis_server, "check").stdout.strip() == "ok: 1 live consumer"

    # kill -9: the consumer stays registered until its lease (1 s) expires.
    consumer.signal(signal.SIGKILL)
    await consumer.wait(10)
    await eventually(
        lambda: admin(redis_server, "check").returncode == 1, what="the lease to expire"
    )
    result = admin(redis_server, "check")
    assert "no consumer holds a live lease (1 registered, every lease expired)" in result.stderr


# --- logs -----------------------------------------------------------------------------------


async def test_a_request_id_is_echoed_and_travels_in_the_signups_jobs(
    client: QuartClient, redis: aioredis.Redis, keys: Keys
) -> None:
    response = await client.post(
        "/signup",
        json={"username": "trace", "email": "trace@example.com"},
        headers={"X-Request-ID": "trace-42"},
    )
    assert response.status_code == 201
    assert response.headers["X-Request-ID"] == "trace-42"
    for queue in map(keys.queue, ("email", "marketing", "profile")):
        (raw,) = await redis.lrange(queue, 0, -1)
        assert decode(raw).request_id == "trace-42"


@pytest.mark.parametrize("sent", [None, "", "has space", "x" * 129, "tab\there", "caf\u00e9"])
async def test_a_missing_or_unsafe_request_id_is_replaced_by_a_generated_one(
    client: QuartClient, sent: str | None
) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent}
    response = await client.get("/healthz", headers=headers)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def _record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("some.logger", logging.WARNING, __file__, 1, message, args, exc_info)


def test_json_lines_carry_the_ids_the_extra_fields_and_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        record = _record("job %s failed", "j1", exc=exc)
    record.status = 201
    token, job = logs.request_id.set("r1"), logs.job_id.set("j1")
    try:
        line = JsonFormatter().format(record)
    finally:
        logs.request_id.reset(token)
        logs.job_id.reset(job)
    assert "\n" not in line
    fields = orjson.loads(line)
    assert fields["level"] == "WARNING"
    assert fields["logger"] == "some.logger"
    assert fields["message"] == "job j1 failed"
    assert (fields["request_id"], fields["job_id"], fields["status"]) == ("r1", "j1", 201)
    assert fields["exc_info"].endswith("ValueError: boom")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["time"])


def test_text_lines_show_the_request_id_and_cannot_be_split_by_input() -> None:
    token = logs.request_id.set("r1")
    try:
        line = TextFormatter().format(_record("user %s", "eve\nINFO forged line"))
    finally:
        logs.request_id.reset(token)
    assert line.endswith("WARNING some.logger: [req=r1] user eve\\nINFO forged line")
    assert "\n" not in line


class _StdlibText(TextFormatter):
    """The text line as logging.Formatter makes it from TEXT_FORMAT: what TextFormatter
    writes in one step."""

    def format(self, record: logging.LogRecord) -> str:
        rid = logs.request_id.get()
        record.ids = "" if rid is None else f" [req={rid}]"
        return logging.Formatter.format(self, record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.replace("\r", "\\r").replace("\n", "\\n")
        return logging.Formatter.formatMessage(self, record)


@pytest.mark.parametrize("request_id", [None, "r1"])
@pytest.mark.parametrize("trouble", ["none", "exc", "stack", "both"])
def test_text_lines_are_the_format_strings(request_id: str | None, trouble: str) -> None:
    """The text formatter's line is TEXT_FORMAT's, traceback and stack included."""
    try:
        raise ValueError("boom\nline two")
    except ValueError:
        exc_info = sys.exc_info()
    record = _record("user %s at %d", "eve\r\nforged", 3)
    if trouble in ("exc", "both"):
        record.exc_info = exc_info
    if trouble in ("stack", "both"):
        record.stack_info = "Stack (most recent call last):\n  here"
    twin = logging.makeLogRecord(record.__dict__)
    token = logs.request_id.set(request_id)
    try:
        assert TextFormatter().format(record) == _StdlibText().format(twin)
    finally:
        logs.request_id.reset(token)


def test_mask_email() -> None:
    assert logs.mask_email("alice@example.com") == "a***@example.com"
    assert logs.mask_email("not-an-address") == "***"


async def test_one_signup_can_be_traced_through_both_processes_json_logs(
    spawn: Spawn, redis_server: RedisServer, redis: aioredis.Redis, asgi_server: str
) -> None:
    env = child_env(redis_server, LOG_FORMAT="json")
    consumer = spawn(consumer_argv(), env)
    async with web(spawn, env, server=asgi_server) as (port, server):
        status, headers, _ = await request(
            port,
            "POST",
            "/signup",
            {"username": "tracy", "email": "tracy@example.com"},
            headers={"X-Request-ID": "trace-e2e"},
        )
        assert status == 201
        assert headers["x-request-id"] == "trace-e2e"

        def lines(child: Child) -> list[dict[str, Any]]:
            return [orjson.loads(line) for line in child.output().splitlines() if line]

        def traced(child: Child) -> list[dict[str, Any]]:
            return [line for line in lines(child) if line.get("request_id") == "trace-e2e"]

        await eventually(
            lambda: any("welcome email" in line["message"] for line in traced(consumer)),
            what="the welcome email's log line",
        )
        # The access line is written once the response has gone out: under load it can come
        # after the consumer's line (CI saw that once), so it is waited for as well.
        await eventually(lambda: traced(server), what="the web's access line")
        (access,) = traced(server)
        assert access["logger"] == "service.access"
        assert (access["method"], access["path"], access["status"]) == ("POST", "/signup", 201)
        (sent,) = [line for line in traced(consumer) if "welcome email" in line["message"]]
        assert "t***@example.com" in sent["message"]
        assert len(sent["job_id"]) == 32
        # Every line of both processes is JSON, and no INFO line shows the address.
        assert "tracy@example.com" not in consumer.output() + server.output()


async def test_the_access_line_names_the_request_and_can_be_turned_off(
    make_settings: Callable[..., Settings], redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    for enabled in (True, False):
        app = create_app(resolve(make_settings(access_log=enabled)))
        async with app.test_app() as test_app:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="service.access"):
                await test_app.test_client().get("/users/nobody?x=%0Aforged")
        access = [r for r in caplog.records if r.name == "service.access"]
        if not enabled:
            assert access == []
            continue
        (record,) = access
        assert re.fullmatch(
            r'127.0.0.1 "GET /users/nobody\?x=%0Aforged" 404 \d+\.\d ms', record.getMessage()
        )
        fields = (record.method, record.path, record.status)  # type: ignore[attr-defined]
        assert fields == ("GET", "/users/nobody?x=%0Aforged", 404)


async def test_the_access_lines_of_one_loop_turn_are_logged_at_its_end_with_their_ids() -> None:
    logged: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(self.format(record))

    handler = Lines()
    handler.setFormatter(TextFormatter())
    access = logging.getLogger("service.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)  # setLevel, not .level: the loggers' cached levels go too
    try:
        lines = AccessLines()
        lines.add(AccessLine("first-id", "10.0.0.1", "POST", "/signup", 201, 0.0021))
        lines.add(AccessLine("second-id", "10.0.0.2", "GET", "/users/x?y=1", 404, 0.0004))
        assert logged == []  # the turn has not ended
        await asyncio.sleep(0)  # it ends before this task goes on
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert [line.split(" ", 3)[3] for line in logged] == [
        'service.access: [req=first-id] 10.0.0.1 "POST /signup" 201 2.1 ms',
        'service.access: [req=second-id] 10.0.0.2 "GET /users/x?y=1" 404 0.4 ms',
    ]
    assert logs.request_id.get() is None  # each id set only for its line


# --- metrics --------------------------------------------------------------------------------


def sample(metrics: Samples, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_signups_move_the_outcome_counters_and_the_request_metrics(
    client: QuartClient,
) -> None:
    before = await scrape(client)
    assert sample(before, "signup_signups_total", outcome="created") == 0
    body = {"username": "metric", "email": "metric@example.com"}
    assert (await client.post("/signup", json=body)).status_code == 201
    assert (await client.post("/signup", json=body)).status_code == 409
    assert (await client.post("/signup", json={"username": "x"})).status_code == 422
    after = await scrape(client)
    for outcome, count in (("created", 1), ("conflict", 1), ("invalid", 1), ("unavailable", 0)):
        assert sample(after, "signup_signups_total", outcome=outcome) == count, outcome
    requests = "signup_http_requests_total"
    assert sample(after, requests, route="/signup", method="POST", status="201") == 1
    assert sample(after, requests, route="/signup", method="POST", status="409") == 1
    assert sample(after, requests, route="/metrics", method="GET", status="200") == 1
    histogram = "signup_http_request_duration_seconds_count"
    assert sample(after, histogram, route="/signup") == 3
    # The queues' gauges come from Redis: one signup's three jobs wait.
    for queue in ("email", "marketing", "profile"):
        assert sample(after, "signup_queue_depth", queue=queue) == 1
        assert sample(after, "signup_dead_letters", queue=queue) == 0
    assert sample(after, "signup_redis_up") == 1


async def test_a_users_route_is_labelled_by_its_rule_not_its_path(client: QuartClient) -> None:
    await client.get("/users/0123456789abcdef0123456789abcdef")
    await client.get("/no/such/thing")
    metrics = await scrape(client)
    requests = "signup_http_requests_total"
    assert sample(metrics, requests, route="/users/<user_id>", method="GET", status="404") == 1
    assert sample(metrics, requests, route="<unmatched>", method="GET", status="404") == 1


async def test_metrics_without_redis_still_answer_with_redis_up_0(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(resolve(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")))
    async with app.test_app() as test_app:
        metrics = await scrape(test_app.test_client())
    assert sample(metrics, "signup_redis_up") == 0
    assert ("signup_queue_depth", (("queue", "email"),)) not in metrics


async def test_metrics_are_summed_over_hypercorns_workers(
    spawn: Spawn,
    redis_server: RedisServer,
    redis: aioredis.Redis,
    tmp_path: Path,
    asgi_server: str,
) -> None:
    env = child_env(redis_server, METRICS_DIR=str(tmp_path / "metrics"), ACCESS_LOG="false")
    async with web(spawn, env, workers=2, server=asgi_server) as (port, _):
        # Sign up, a new connection each, until both workers have served some (the kernel
        # decides which accepts; on a busy machine one may take many in a row).
        signups = 0

        async def both_workers_served() -> bool:
            nonlocal signups
            for _ in range(10):
                body = {"username": f"worker{signups}", "email": f"worker{signups}@example.com"}
                assert (await http(port, "POST", "/signup", body))[0] == 201
                signups += 1
            (directory,) = (tmp_path / "metrics").iterdir()
            return len(list(directory.glob("counter_*.db"))) == 2  # one file per worker

        await eventually(both_workers_served, timeout=30, what="signups served by both workers")
        # Each scrape is a new connection, served by either worker: each must see all.
        for _ in range(6):
            status, _, text = await request(port, "GET", "/metrics")
            assert status == 200
            metrics = parse_metrics(text.decode())
            assert sample(metrics, "signup_signups_total", outcome="created") == signups


async def test_a_processed_job_moves_the_consumers_metrics(
    spawn: Spawn, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys
) -> None:
    port = free_port()
    consumer = spawn(consumer_argv("--metrics-port", str(port)), child_env(redis_server))
    await eventually(lambda: "consuming" in consumer.output(), what="the consumer to start")
    await push_emails(redis, keys, 3)
    await redis.lpush(keys.queue("email"), b"not a job")

    async def scraped() -> Samples:
        status, _, text = await request(port, "GET", "/metrics")
        assert status == 200
        return parse_metrics(text.decode())

    async def all_finished() -> bool:
        metrics = await scraped()
        return (
            sample(metrics, "signup_jobs_total", type="welcome_email", outcome="succeeded") == 3
            and sample(metrics, "signup_jobs_total", type="unknown", outcome="dead_lettered") == 1
        )

    await eventually(all_finished, what="the jobs to be counted")
    metrics = await scraped()
    assert sample(metrics, "signup_job_queue_wait_seconds_count", queue="email") == 3
    assert sample(metrics, "signup_job_run_seconds_count", type="welcome_email") == 3
    assert sample(metrics, "signup_jobs_recovered_total", outcome="returned") == 0
    assert (await request(port, "GET", "/other"))[0] == 404


# --- serving ------------------------------------------------------------------------------


@pytest.mark.parametrize("to_group", [False, True], ids=["master", "whole-group"])
async def test_a_request_in_flight_at_sigterm_still_gets_its_201(
    spawn: Spawn,
    redis_server: RedisServer,
    redis: aioredis.Redis,
    keys: Keys,
    to_group: bool,
    asgi_server: str,
) -> None:
    """SIGTERM to hypercorn's master (docker stop), or to every process of the group (Heroku,
    systemd), while a signup waits on Redis in one of two workers: it is answered 201, and
    its access line is written before the worker exits."""
    async with web(spawn, child_env(redis_server), workers=2, server=asgi_server) as (port, server):
        # Hold writes for 0.8 s (below the web client's 1 s socket timeout): the signup's
        # commit waits in Redis while SIGTERM arrives.
        await redis.execute_command("CLIENT", "PAUSE", 800, "WRITE")
        body = {"username": "inflight", "email": "inflight@example.com"}
        answer = asyncio.create_task(
            request(port, "POST", "/signup", body, headers={"X-Request-ID": "at-sigterm"})
        )

        async def commit_waiting() -> bool:
            return int((await redis.info("clients"))["blocked_clients"]) >= 1

        await eventually(commit_waiting, what="the signup's commit to wait in Redis")
        if to_group:
            os.killpg(server.process.pid, signal.SIGTERM)
        else:
            server.signal(signal.SIGTERM)
        status, _, created = await asyncio.wait_for(answer, 10)
        assert status == 201, created
        assert await server.wait(30) == 0
        assert re.search(r'\[req=at-sigterm\] \S+ "POST /signup" 201 ', server.output())
    assert await redis.hget(keys.user(created["user_id"]), "username") == b"inflight"


def test_metrics_dirs_of_masters_that_are_gone_are_removed(tmp_path: Path) -> None:
    gone = tmp_path / "web-999999999-1"  # no such pid
    reused = tmp_path / f"web-{os.getpid()}-0"  # a live pid, but started at another time
    gone.mkdir()
    reused.mkdir()
    try:
        mine = Path(use_multiprocess_dir(str(tmp_path)))
    finally:
        # This test process goes back to keeping its metrics to itself.
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    assert mine.parent == tmp_path and mine.name.startswith(f"web-{os.getpid()}-")
    assert mine != reused
    assert sorted(tmp_path.iterdir()) == [mine]


def test_a_worker_file_not_yet_sized_does_not_fail_the_scrape(tmp_path: Path) -> None:
    """A worker creates its metrics file empty, then sizes it: a scrape that reads it in
    between still sums the others (prometheus_client alone raises struct.error: a 500)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    counted = MmapedDict(str(tmp_path / "counter_101.db"))
    key = mmap_key("signup_test", "signup_test_total", [], [], "a test counter")
    counted.write_value(key, 3.0, 0.0)
    counted.close()
    (tmp_path / "counter_102.db").touch()  # the other worker, between create and size
    merged = CollectorRegistry(auto_describe=True)
    WorkersCollector(merged, str(tmp_path))  # type: ignore[no-untyped-call]
    assert "signup_test_total 3.0" in generate_latest(merged).decode()


def test_a_metrics_port_in_use_is_one_line(redis_server: RedisServer) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            consumer_argv("--metrics-port", str(port)),
            env=child_env(redis_server),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"python -m consumers: error: cannot serve metrics on port {port}: ")
