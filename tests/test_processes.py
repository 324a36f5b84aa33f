"""The processes as deployed: ``hypercorn service:app`` and ``python -m consumers`` as
subprocesses, real signals, a real SMTP server, the suite's Redis."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from devtools.embedded_redis import embedded_redis_server, free_port
from pipeline.keys import Keys
from pipeline.queue import DirectQueue
from reactions.profile import PROFILE
from tests.helpers import REGISTRY, RedisServer, SmtpSink, debian_redis, eventually
from tests.processes import ROOT, Child, child_env, consumer_argv, http, push_emails, request, web

#: What a server process started by `make run` is called (Redis, or the embedded Valkey).
SERVER_NAMES = ("redis-server", "valkey-server")


async def test_end_to_end_signup_to_welcome_email(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, smtp_server: SmtpSink
) -> None:
    env = child_env(redis_server, SMTP_URL=smtp_server.url, EMAIL_FROM="hello@example.com")
    async with web(spawn, env) as (port, web_child):
        worker = spawn(consumer_argv(), env)
        status, created = await http(
            port, "POST", "/signup", {"username": "newcomer", "email": "new@example.com"}
        )
        assert status == 201
        await eventually(
            lambda: smtp_server.recipients() == ["new@example.com"], what="the welcome email"
        )
        message = smtp_server.messages[0]
        assert "newcomer" in message.get_body(("plain",)).get_content()

        async def processed() -> bool:
            stats = (await http(port, "GET", "/stats"))[1]
            return (
                stats["emails_sent"],
                stats["marketing_list_updates"],
                stats["profiles_generated"],
            ) == (1, 1, 1)

        await eventually(processed, what="all three jobs")

        async def measured() -> bool:
            stats = (await http(port, "GET", "/stats"))[1]
            return all(stats["latency"][q]["samples"] == 1 for q in stats["latency"])

        await eventually(measured, what="latency samples (written every second)")
        stats = (await http(port, "GET", "/stats"))[1]
        assert stats["consumers"] == 1
        assert stats["processing"] == stats["delayed"] == dict.fromkeys(REGISTRY.queues, 0)
        assert stats["latency"]["email"]["wait_ms"]["p99"] >= 0
        status, user = await http(port, "GET", f"/users/{created['user_id']}")
        assert status == 200
        assert user["profile"]["display_name"] == "Newcomer"
        worker.signal(signal.SIGTERM)
        web_child.signal(signal.SIGTERM)
        assert await worker.wait(15) == 0
        assert await web_child.wait(15) == 0


async def test_sigterm_mid_stream_exits_0_and_loses_nothing(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys, smtp_server: SmtpSink
) -> None:
    smtp_server.delay = 0.02
    env = child_env(redis_server, SMTP_URL=smtp_server.url, CONSUMER_CONCURRENCY="email=4")
    worker = spawn(consumer_argv(), env)
    pushed = await push_emails(redis, keys, 100)
    feeding = asyncio.create_task(
        push_emails(redis, keys, 100, start=100)
    )  # a stream still arriving
    await eventually(lambda: smtp_server.started >= 20, what="the worker to be busy")
    assert await worker.stop() == 0
    pushed += await feeding
    sent = smtp_server.recipients()
    assert len(sent) == len(set(sent)), "an email was sent twice"
    assert int(await redis.hget(keys.stats, "emails_sent")) == len(sent)
    left = await redis.llen(keys.queue("email"))
    assert len(sent) + left == len(pushed), "a job was lost"
    assert "SIGTERM" in worker.output()

    # A new worker finishes the rest: every address got exactly one email.
    smtp_server.delay = 0
    second = spawn(consumer_argv(), env)
    await eventually(lambda: len(smtp_server.recipients()) == len(pushed), what="the rest")
    second.signal(signal.SIGINT)
    assert await second.wait(15) == 0
    assert sorted(smtp_server.recipients()) == sorted(pushed)


async def busy_worker(
    spawn: Any,
    redis_server: RedisServer,
    redis: aioredis.Redis,
    keys: Keys,
    smtp: SmtpSink,
    *,
    jobs: int,
    concurrency: int,
    grace: str,
) -> Child:
    """A consumer whose SMTP server stalls, once it holds ``concurrency`` jobs in flight."""
    smtp.delay = 30
    env = child_env(redis_server, SMTP_URL=smtp.url, CONSUMER_CONCURRENCY=f"email={concurrency}")
    worker = spawn(consumer_argv("--grace-period", grace), env)
    await push_emails(redis, keys, jobs)
    await eventually(lambda: smtp.started == concurrency, what="the worker's jobs in flight")
    return worker


async def test_jobs_outliving_the_grace_period_are_returned(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys, smtp_server: SmtpSink
) -> None:
    worker = await busy_worker(
        spawn, redis_server, redis, keys, smtp_server, jobs=10, concurrency=3, grace="0.5"
    )
    assert await worker.stop(10) == 0
    assert await redis.llen(keys.queue("email")) == 10
    assert "cancelling 3 jobs" in worker.output()


async def test_second_sigint_stops_at_once(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys, smtp_server: SmtpSink
) -> None:
    worker = await busy_worker(
        spawn, redis_server, redis, keys, smtp_server, jobs=4, concurrency=2, grace="120"
    )
    worker.signal(signal.SIGINT)
    await eventually(lambda: "SIGINT: stopping" in worker.output(), what="the first SIGINT")
    worker.signal(signal.SIGINT)
    assert await worker.wait(5) == 0
    assert "SIGINT again: stopping now" in worker.output()
    assert await redis.llen(keys.queue("email")) == 4


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {"SHUTDOWN_GRACE_PERIOD": "soon"}, "SHUTDOWN_GRACE_PERIOD='soon'"),
        ((), {"REDIS_URL": "http://nope"}, "REDIS_URL='http://nope'"),
        (
            (),
            {"REDIS_URL": "redis+sentinel://app:hunter2@s1:26379"},
            "REDIS_URL='redis+sentinel://app:***@s1:26379': the URL names no service",
        ),
        (("--concurrency", "email=lots"), {}, "--concurrency"),
        (("--queues", "nosuchqueue"), {}, "--queues"),
        (("--frobnicate",), {}, "--frobnicate"),
    ],
)
def test_consumer_bad_configuration_is_one_line(
    redis_server: RedisServer, args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    result = subprocess.run(
        consumer_argv(*args),
        env=child_env(redis_server, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_web_bad_configuration_is_one_line(redis_server: RedisServer) -> None:
    env = child_env(redis_server, MAX_BODY_BYTES="huge")
    result = subprocess.run(
        [sys.executable, "-m", "hypercorn", "service:app", "--bind", f"127.0.0.1:{free_port()}"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    # Start-up stops with one line and no traceback. (hypercorn 0.18 then exits 0 whatever
    # its worker's code, pgjones/hypercorn#269: hence the Procfile's check, below.)
    assert result.stderr.strip().splitlines() == [
        "error: MAX_BODY_BYTES='huge': expected a whole number"
    ]
    check = subprocess.run(
        [sys.executable, "-m", "pipeline.plan"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 2
    assert check.stderr == "error: MAX_BODY_BYTES='huge': expected a whole number\n"
    good = subprocess.run(
        [sys.executable, "-m", "pipeline.plan"],
        env=child_env(redis_server),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (good.returncode, good.stderr) == (0, "")


def test_procfile_runs_the_settings_check_before_hypercorn() -> None:
    web = next(
        line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:")
    )
    assert "python -m pipeline.plan && exec hypercorn --config hypercorn.toml" in web
    assert "${PORT:-8000}" in web
    assert "--workers ${WEB_CONCURRENCY:-2}" in web


async def test_client_gone_mid_body_leaves_nothing(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys
) -> None:
    async with web(spawn, child_env(redis_server)) as (port, _):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        body = orjson.dumps({"username": "halfway", "email": "half@example.com"})
        writer.write(
            b"POST /signup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        # The server is still fine, and the half-sent signup left nothing behind.
        status, _ = await http(
            port, "POST", "/signup", {"username": "whole", "email": "whole@example.com"}
        )
        assert status == 201
        assert await redis.hlen(keys.username_claims) == 1
        assert await redis.hget(keys.username_claims, "halfway") is None


async def start_make_run(spawn: Any, env: dict[str, str], *args: str) -> Child:
    """``python -m devtools.devserver`` (what ``make run`` runs), once a signup gets a 201."""
    port = int(env["PORT"])
    supervisor = spawn([sys.executable, "-m", "devtools.devserver", *args], env)

    name = f"runner{os.urandom(4).hex()}"

    async def serving() -> bool:
        assert supervisor.process.poll() is None, supervisor.output()
        try:
            body = {"username": name, "email": f"{name}@example.com"}
            return (await http(port, "POST", "/signup", body))[0] == 201
        except OSError:
            return False

    await eventually(serving, timeout=30, what="make run's web service")
    return supervisor


async def test_make_run_supervisor_stops_everything_on_ctrl_c(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys
) -> None:
    import psutil

    env = child_env(redis_server, PORT=str(free_port()), WEB_CONCURRENCY="1")
    supervisor = await start_make_run(spawn, env)
    await eventually(lambda: redis.hget(keys.stats, "emails_sent"), what="make run's worker")
    assert "REDIS_URL is set: using that Redis, starting none" in supervisor.output()
    # The dashboard too, on loopback, locked with a password made for the run and shown.
    board = int(env["DASHBOARD_PORT"])
    shown = re.search(
        rf"dashboard on http://127\.0\.0\.1:{board}: user admin, password (\S+) \(made for",
        supervisor.output(),
    )
    assert shown is not None, supervisor.output()
    credentials = base64.b64encode(f"admin:{shown[1]}".encode()).decode()

    async def dashboard_answers() -> bool:
        try:
            return (await request(board, "GET", "/"))[0] == 401
        except OSError:
            return False

    await eventually(dashboard_answers, what="make run's dashboard")
    status, _, _ = await request(
        board, "GET", "/", headers={"Authorization": f"Basic {credentials}"}
    )
    assert status == 200
    children = psutil.Process(supervisor.process.pid).children(recursive=True)
    assert len(children) >= 4  # web master, web worker, consumer, dashboard
    supervisor.signal(signal.SIGINT)
    assert await supervisor.wait(30) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    assert "web exit 0, worker exit 0, dashboard exit 0" in supervisor.output()


async def test_make_run_starts_its_own_redis_and_a_second_ctrl_c_stops_at_once(
    spawn: Any, redis_server: RedisServer, smtp_server: SmtpSink, tmp_path: Path
) -> None:
    import psutil

    smtp_server.delay = 30  # the welcome email stays in flight
    env = child_env(
        redis_server,
        PORT=str(free_port()),
        WEB_CONCURRENCY="1",
        SMTP_URL=smtp_server.url,
        SHUTDOWN_GRACE_PERIOD="60",
    )
    del env["REDIS_URL"]
    redis_port = free_port()
    supervisor = await start_make_run(
        spawn, env, "--redis-port", str(redis_port), "--data-dir", str(tmp_path / "redis")
    )
    assert f"on 127.0.0.1:{redis_port}" in supervisor.output()
    children = psutil.Process(supervisor.process.pid).children(recursive=True)
    assert any(name in " ".join(child.cmdline()) for child in children for name in SERVER_NAMES)
    await eventually(lambda: smtp_server.started == 1, what="the welcome email in flight")
    supervisor.signal(signal.SIGINT)
    await eventually(lambda: "SIGTERM: stopping" in supervisor.output(), what="the first Ctrl-C")
    supervisor.signal(signal.SIGINT)
    # Well inside the 60 s grace period: the second Ctrl-C reached the worker.
    assert await supervisor.wait(10) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    output = supervisor.output()
    assert "SIGINT again: stopping now" in output
    assert "returned an unfinished job" in output
    assert "worker exit 0" in output


async def test_queues_flag_limits_what_a_consumer_serves(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = DirectQueue(redis, keys, REGISTRY)
    payload = {"user_id": "a" * 32, "username": "alice", "email": "a@example.com", "created_at": 1}
    await queue.push("welcome_email", payload)
    await queue.push("generate_profile", payload)
    worker = spawn(
        consumer_argv("--queues", "profile", "--concurrency", "2"), child_env(redis_server)
    )
    await eventually(lambda: redis.exists(PROFILE.key(keys, "a" * 32)), what="the profile job")
    assert await worker.stop(10) == 0
    assert await redis.llen(keys.queue("email")) == 1  # not served by this consumer
    assert "profilex2" in worker.output()


async def test_make_run_starts_after_a_switch_between_valkey_and_redis(
    spawn: Any, tmp_path: Path
) -> None:
    """Valkey's files stop a Redis 7 at start-up (``Bad file format``): each kind of server
    keeps its own, so a user who installs redis-server after a first run on the embedded Valkey
    (or the other way round) gets a running `make run`, and their signups back on return."""
    data = tmp_path / "redis"
    seen = []
    for binary in (embedded_redis_server(), debian_redis(), embedded_redis_server()):
        env = child_env("", PORT=str(free_port()), WEB_CONCURRENCY="1", REDIS_SERVER=binary)
        del env["REDIS_URL"]
        redis_port = free_port()
        supervisor = await start_make_run(
            spawn, env, "--redis-port", str(redis_port), "--data-dir", str(data)
        )
        client = aioredis.Redis(port=redis_port)
        seen.append(await client.hlen(Keys("signup").username_claims))
        await client.aclose()
        supervisor.signal(signal.SIGINT)
        assert await supervisor.wait(30) == 0, supervisor.output()
    assert sorted(p.name for p in data.iterdir()) == ["redis-7", "valkey-9"]
    # Each start signed one user up; the third start is Valkey again, with its first user.
    assert seen == [1, 1, 2]


async def test_make_run_shows_a_server_that_does_not_start_in_its_own_words(
    spawn: Any, tmp_path: Path
) -> None:
    env = child_env("", PORT=str(free_port()), REDIS_SERVER=embedded_redis_server())
    del env["REDIS_URL"]
    data = tmp_path / "redis"
    appendonly = data / "valkey-9" / "appendonlydir"
    appendonly.mkdir(parents=True)
    (appendonly / "appendonly.aof.manifest").write_text("this is not a manifest\n")
    supervisor = spawn(
        [sys.executable, "-m", "devtools.devserver", "--redis-port", str(free_port()),
         "--data-dir", str(data)],
        env,
    )  # fmt: skip
    assert await supervisor.wait(30) == 1
    output = supervisor.output()
    assert "did not start (its files are in " in output
    assert "manifest" in output.split("its last lines:")[1].lower()  # the server's own words
    assert "taken" not in output  # no guess that the port is taken


async def test_make_run_serves_on_loopback_unless_told_otherwise(
    spawn: Any, redis_server: RedisServer
) -> None:
    import psutil

    for given, expected in ((None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")):
        port = free_port()
        env = child_env(redis_server, PORT=str(port), WEB_CONCURRENCY="1")
        env.pop("WEB_HOST", None)
        if given is not None:
            env["WEB_HOST"] = given
        supervisor = await start_make_run(spawn, env)
        family = psutil.Process(supervisor.process.pid).children(recursive=True)
        listening = {
            c.laddr.ip
            for p in family
            for c in p.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert listening == {expected}
        assert f"web on http://{expected}:{port}" in supervisor.output()
        supervisor.signal(signal.SIGINT)
        assert await supervisor.wait(30) == 0


def test_the_web_does_not_import_the_smtp_client() -> None:
    """The web imports the welcome email's reaction for its receiver, but never sends: the
    SMTP client is the consumers' alone (a consumer with SMTP_URL imports it at start-up)."""
    code = "import sys, service; print(sorted(m for m in sys.modules if 'smtp' in m))"
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]", found.stdout
