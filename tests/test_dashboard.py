"""The operator's dashboard (``python -m consumers dashboard``): locked, strict about what the
page may load, one Redis round trip per refresh, and its own process."""

from __future__ import annotations

import base64
import re
import subprocess
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from dashboard.app import CSP, create_dashboard
from dashboard.guard import MAX_FAILURES
from devtools.embedded_redis import free_port
from pipeline.keys import Keys
from pipeline.plan import resolve
from pipeline.queue import HISTORY_BUCKET, HISTORY_SECONDS, Broker, DirectQueue
from pipeline.stats import HistoryCache, read_stats
from tests.helpers import REGISTRY, RedisServer, client_commands, eventually
from tests.processes import ROOT, child_env, consumer_argv, request, start_dashboard

PASSWORD = "correct horse battery"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


GOOD = basic("admin", PASSWORD)


@pytest.fixture
async def dashboard(make_settings: Any, redis: aioredis.Redis) -> Any:
    app = create_dashboard(resolve(make_settings({"DASHBOARD_PASSWORD": PASSWORD})))
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def test_every_request_needs_the_password(dashboard: Any) -> None:
    for path in ("/", "/api/overview", "/static/dashboard.js"):
        refused = await dashboard.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["WWW-Authenticate"].startswith('Basic realm="signup dashboard"')
        assert refused.headers["Content-Security-Policy"] == CSP
    for wrong in (basic("admin", "wrong"), basic("root", PASSWORD), {"Authorization": "Basic !"}):
        assert (await dashboard.get("/", headers=wrong)).status_code == 401
    page = await dashboard.get("/", headers=GOOD)
    assert page.status_code == 200
    assert page.headers["Content-Security-Policy"] == CSP
    assert page.headers["X-Frame-Options"] == "DENY"
    text = await page.get_data(as_text=True)
    # No inline script or handler: the CSP (script-src 'self') would refuse them anyway.
    assert re.findall(r"<script[^>]*>", text) == ['<script src="/static/dashboard.js" defer>']
    assert re.search(r"\son[a-z]+=", text) is None
    assert (await dashboard.get("/static/dashboard.css", headers=GOOD)).status_code == 200


async def test_wrong_passwords_are_rate_limited(dashboard: Any) -> None:
    outside = {"client": ("203.0.113.7", 1000)}
    for _ in range(MAX_FAILURES):
        wrong = await dashboard.get("/", headers=basic("admin", "nope"), scope_base=outside)
        assert wrong.status_code == 401
    locked = await dashboard.get("/", headers=GOOD, scope_base=outside)  # even the right one
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) >= 1
    # Another client is not locked out by it.
    assert (await dashboard.get("/", headers=GOOD)).status_code == 200


async def test_the_overview_follows_the_queues(
    dashboard: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    first = orjson.loads(await (await dashboard.get("/api/overview", headers=GOOD)).get_data())
    assert [q["name"] for q in first["queues"]] == list(REGISTRY.queues)
    assert all(q["waiting"] == 0 and q["oldest_wait_s"] is None for q in first["queues"])
    queue = DirectQueue(redis, keys, REGISTRY)
    for n in range(3):
        await queue.push("welcome_email", {"user_id": "0" * 32, "email": f"{n}@example.com"})
    second = orjson.loads(await (await dashboard.get("/api/overview", headers=GOOD)).get_data())
    email = next(q for q in second["queues"] if q["name"] == "email")
    assert email["waiting"] == 3 and email["oldest_wait_s"] >= 0
    assert set(second["counters"]) == set(REGISTRY.counters)


async def test_a_refresh_is_one_redis_round_trip(
    dashboard: Any, redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    await dashboard.get("/api/overview", headers=GOOD)  # loads the script

    async def refresh_five_times() -> None:
        for _ in range(5):
            assert (await dashboard.get("/api/overview", headers=GOOD)).status_code == 200

    # What is sent: one script, and each queue's latency samples read beside it.
    per_refresh = ["EVALSHA"] + ["LRANGE"] * len(REGISTRY.queues)
    assert await client_commands(redis_server, redis, refresh_five_times) == per_refresh * 5
    # And it arrives as one read per refresh: Redis counts the reads it makes from clients.
    before = (await redis.info("stats"))["total_reads_processed"]
    await refresh_five_times()
    after = (await redis.info("stats"))["total_reads_processed"]
    assert after - before == 5 + 1  # and the INFO that read ``after``


async def test_a_refresh_reads_only_the_history_buckets_it_has_not_read(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """The chart's closed buckets are read once: a bucket the clock has left never changes."""
    cache = HistoryCache()

    async def chart() -> dict[int, int]:
        stats = await read_stats(redis, keys, REGISTRY, history=cache)
        return {bucket.start: bucket.done for bucket in stats.history}

    async def early_in_a_bucket() -> bool:  # so the reads below all see one current bucket
        return int((await redis.time())[0]) % HISTORY_BUCKET < HISTORY_BUCKET - 2

    await eventually(early_in_a_bucket, timeout=HISTORY_BUCKET + 1, what="a fresh bucket")
    now = int((await redis.time())[0])
    current = now - now % HISTORY_BUCKET
    closed = current - 3 * HISTORY_BUCKET
    for start, done in ((closed, 5), (current, 7)):
        await redis.hset(f"{keys.history_prefix}{start}", "done", done)
    first = await chart()
    assert len(first) == HISTORY_SECONDS // HISTORY_BUCKET
    assert (first[closed], first[current]) == (5, 7)
    assert current - HISTORY_BUCKET in cache.rows and current not in cache.rows
    # Written behind its back (no consumer does: the clock has left it), a closed bucket is
    # not read again; the current one is.
    for start, done in ((closed, 500), (current, 8)):
        await redis.hset(f"{keys.history_prefix}{start}", "done", done)
    second = await chart()
    assert (second[closed], second[current]) == (5, 8)
    assert list(second) == list(first)
    # A fresh cache reads them all.
    assert (await read_stats(redis, keys, REGISTRY, history=True)).history[-4].done == 500


async def test_open_only_on_loopback(make_settings: Any, redis: aioredis.Redis) -> None:
    app = create_dashboard(resolve(make_settings()))
    async with app.test_app() as test_app:
        page = await test_app.test_client().get("/")
        assert page.status_code == 200
        assert "Open: no DASHBOARD_PASSWORD" in await page.get_data(as_text=True)


def test_the_command_refuses_to_run_open_beyond_loopback(redis_server: RedisServer) -> None:
    env = child_env(redis_server, DASHBOARD_BIND="0.0.0.0", DASHBOARD_PORT=str(free_port()))
    result = subprocess.run(
        consumer_argv("dashboard"), env=env, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "python -m consumers dashboard: error: DASHBOARD_PASSWORD is not set, so the dashboard "
        "may listen on a loopback address only (DASHBOARD_BIND='0.0.0.0')"
    ]
    short = child_env(redis_server, DASHBOARD_PASSWORD="short")
    result = subprocess.run(
        consumer_argv("dashboard"), env=short, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "python -m consumers: error: DASHBOARD_PASSWORD='***': expected at least 12 printable "
        "characters",
    )


async def test_the_command_serves_until_sigterm(spawn: Any, redis_server: RedisServer) -> None:
    env = child_env(redis_server, DASHBOARD_PASSWORD=PASSWORD)
    port, child = await start_dashboard(spawn, env)
    assert (await request(port, "GET", "/"))[0] == 401
    status, _, body = await request(port, "GET", "/api/overview", headers=GOOD)
    assert status == 200 and "queues" in body
    assert f"dashboard on http://127.0.0.1:{port}/" in child.output()
    assert PASSWORD not in child.output()
    assert await child.stop(10) == 0  # SIGTERM
    assert "dashboard stopped" in child.output()


async def test_a_live_consumer_shows_what_its_heartbeat_says(
    dashboard: Any, spawn: Any, redis_server: RedisServer
) -> None:
    worker = spawn(consumer_argv(), child_env(redis_server))

    async def consumers() -> list[dict[str, Any]]:
        answer = await dashboard.get("/api/overview", headers=GOOD)
        found: list[dict[str, Any]] = orjson.loads(await answer.get_data())["consumers"]
        return found

    async def listed() -> bool:
        return bool(await consumers())

    await eventually(listed, what="the consumer's heartbeat")
    (seen,) = await consumers()
    assert seen["pid"] == worker.process.pid
    assert seen["queues"] == dict.fromkeys(REGISTRY.queues, 16)
    assert seen["mode"] == "at-least-once" and seen["in_flight"] == 0
    assert seen["heartbeat_at"] >= seen["started_at"] - 1


async def test_the_history_is_kept_in_bounded_buckets_and_charted(
    dashboard: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    broker = Broker(redis, keys, queues=REGISTRY.queues)

    async def early_in_a_bucket() -> bool:  # so the writes below all land in one bucket
        return int((await redis.time())[0]) % HISTORY_BUCKET < HISTORY_BUCKET - 2

    await eventually(early_in_a_bucket, timeout=HISTORY_BUCKET + 1, what="a fresh bucket")
    await redis.hset(keys.stats, "users", 100)
    await broker.record_history(done=40, failed=3)
    await broker.record_history(done=10, failed=2)  # the same bucket: added up
    now = int((await redis.time())[0])
    current = now - now % HISTORY_BUCKET
    bucket = await redis.hgetall(f"{keys.history_prefix}{current}")
    assert bucket == {b"done": b"50", b"failed": b"5", b"users": b"100"}
    assert (
        0 < await redis.ttl(f"{keys.history_prefix}{current}") <= HISTORY_SECONDS + HISTORY_BUCKET
    )
    # The bucket before counted 70 users: 30 signed up since.
    await redis.hset(f"{keys.history_prefix}{current - HISTORY_BUCKET}", "users", 70)
    answer = orjson.loads(await (await dashboard.get("/api/overview", headers=GOOD)).get_data())
    buckets = answer["history"]["buckets"]
    assert len(buckets) == HISTORY_SECONDS // HISTORY_BUCKET
    assert answer["history"]["bucket_s"] == HISTORY_BUCKET
    last = buckets[-1]
    assert last["start"] == current or last["start"] == current + HISTORY_BUCKET  # a new bucket
    mine = next(b for b in buckets if b["start"] == current)
    assert (mine["done_per_s"], mine["failed_per_s"], mine["signups"]) == (5.0, 0.5, 30)
    assert buckets[0]["signups"] is None  # nothing noted that long ago
