"""The consumer runner in-process: dispatch, dead letters, concurrency, graceful drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import orjson
import pytest
import redis.asyncio as aioredis

from consumers.email import ConsoleEmailBackend
from consumers.handlers import HANDLERS, Handler, HandlerContext
from consumers.runner import Consumer
from pipeline.connections import consumer_client
from pipeline.jobs import Job, decode, new_job
from pipeline.keys import Keys
from pipeline.queue import DirectQueue, read_stats
from pipeline.settings import Settings
from tests.conftest import eventually


@dataclass
class Gate:
    """Lets a test hold jobs in their handler and see which started and finished."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


GATE = Gate()


async def held_email(ctx: HandlerContext, job: Job) -> None:
    """Stands in for welcome_email: runs until the test releases it (or it is cancelled)."""
    GATE.started.append(job.payload["email"])
    try:
        if job.payload.get("slow"):
            await GATE.release.wait()
    except asyncio.CancelledError:
        GATE.cancelled.append(job.payload["email"])
        raise
    GATE.finished.append(job.payload["email"])


async def failing(ctx: HandlerContext, job: Job) -> None:
    raise ValueError("smtp said no")


@dataclass
class Running:
    consumer: Consumer
    stop: asyncio.Event
    force: asyncio.Event
    task: asyncio.Task[None]


@pytest.fixture
async def start_consumer(
    settings: Settings, redis: aioredis.Redis, keys: Keys
) -> AsyncIterator[object]:
    global GATE
    GATE = Gate()
    clients: list[aioredis.Redis] = []
    runs: list[Running] = []

    async def start(
        handlers: Mapping[str, Handler] | None = None,
        concurrency: Mapping[str, int] | None = None,
        grace: float = 5.0,
    ) -> Running:
        client = consumer_client(settings, max_connections=32)
        clients.append(client)
        ctx = HandlerContext(client, keys, ConsoleEmailBackend(), settings.email_from)
        consumer = Consumer(
            client,
            keys,
            handlers or HANDLERS,
            ctx,
            concurrency=concurrency or {"email": 4, "marketing": 4, "profile": 4},
            fetch_timeout=0.2,
            grace_period=grace,
        )
        stop, force = asyncio.Event(), asyncio.Event()
        running = Running(consumer, stop, force, asyncio.create_task(consumer.run(stop, force)))
        runs.append(running)
        return running

    yield start
    GATE.release.set()
    for running in runs:
        running.stop.set()
        running.force.set()
        await asyncio.wait_for(asyncio.shield(running.task), 10)
    for client in clients:
        await client.aclose()


async def test_processes_every_job_type(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = DirectQueue(redis, keys)
    for i in range(5):
        await queue.push(
            "welcome_email",
            {"user_id": f"u{i}", "username": f"user{i}", "email": f"u{i}@example.com"},
        )
        await queue.push(
            "marketing_signup",
            {"user_id": f"u{i}", "email": f"u{i}@example.com", "signed_up_at": i},
        )
        await queue.push(
            "generate_profile",
            {
                "user_id": f"u{i}",
                "username": f"user{i}",
                "email": f"u{i}@example.com",
                "created_at": i,
            },
        )
    running = await start_consumer()  # type: ignore[operator]

    async def all_done() -> bool:
        stats = await read_stats(redis, keys)
        return (
            stats["emails_sent"],
            stats["marketing_list_updates"],
            stats["profiles_generated"],
        ) == (5, 5, 5)

    await eventually(all_done, what="15 jobs processed")
    assert await redis.zcard(keys.marketing) == 5
    running.stop.set()
    await asyncio.wait_for(running.task, 5)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json at all", "undecodable job: not JSON"),
        (b"\xff\xfe\x00garbage", "undecodable job: not JSON"),
        (b"[1, 2, 3]", "undecodable job: the envelope is not a JSON object"),
        (
            b'{"v": 2, "id": "x", "type": "welcome_email", "payload": {}}',
            "unsupported envelope version",
        ),
        (
            b'{"v": 1, "id": "x", "type": "welcome_email", "payload": [], "enqueued_at": 1}',
            "payload is not",
        ),
        (new_job("launch_rockets", {}).encode(), "unknown job type 'launch_rockets'"),
        (new_job("welcome_email", {"no": "fields"}).encode(), "handler failed: KeyError"),
    ],
)
async def test_poison_jobs_go_to_dead_letters_and_the_consumer_keeps_going(
    start_consumer: object, redis: aioredis.Redis, keys: Keys, raw: bytes, reason: str
) -> None:
    await redis.lpush(keys.queue("email"), raw)
    await DirectQueue(redis, keys).push(
        "welcome_email", {"user_id": "u1", "username": "alice", "email": "a@example.com"}
    )
    await start_consumer()  # type: ignore[operator]
    await eventually(lambda: _emails_sent(redis, keys, 1), what="the good job after the poison")
    entries = [orjson.loads(entry) for entry in await redis.lrange(keys.dead, 0, -1)]
    assert len(entries) == 1
    assert entries[0]["queue"] == "email"
    assert reason in entries[0]["reason"]
    assert entries[0]["job"] == raw.decode("utf-8", "backslashreplace")
    assert (await read_stats(redis, keys))["dead_letter"] == 1


async def test_handler_error_is_dead_lettered_with_its_message(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    job = await DirectQueue(redis, keys).push("welcome_email", {"email": "a@example.com"})
    await start_consumer({"welcome_email": failing})  # type: ignore[operator]
    await eventually(lambda: _llen(redis, keys.dead, 1), what="a dead letter")
    entry = orjson.loads(await redis.lindex(keys.dead, 0))
    assert entry["reason"] == "handler failed: ValueError('smtp said no')"
    assert decode(entry["job"].encode()).id == job.id


async def test_a_slow_job_does_not_block_fetching(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = DirectQueue(redis, keys)
    await queue.push("welcome_email", {"email": "slow@example.com", "slow": True})
    for i in range(10):
        await queue.push("welcome_email", {"email": f"fast{i}@example.com"})
    await start_consumer({"welcome_email": held_email}, {"email": 2})  # type: ignore[operator]
    await eventually(lambda: len(GATE.finished) == 10, what="the fast jobs, past the slow one")
    assert GATE.started[0] == "slow@example.com"
    assert "slow@example.com" not in GATE.finished
    GATE.release.set()
    await eventually(lambda: "slow@example.com" in GATE.finished, what="the slow job")


async def test_concurrency_bounds_jobs_in_flight(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = DirectQueue(redis, keys)
    for i in range(5):
        await queue.push("welcome_email", {"email": f"slow{i}@example.com", "slow": True})
    await start_consumer({"welcome_email": held_email}, {"email": 3})  # type: ignore[operator]
    await eventually(lambda: len(GATE.started) == 3, what="three jobs started")
    # The other two stay queued, not popped and held: give the fetch loop a few block times.
    await asyncio.sleep(0.6)
    assert len(GATE.started) == 3
    assert await redis.llen(keys.queue("email")) == 2


async def test_stop_lets_in_flight_jobs_finish_within_the_grace_period(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    await DirectQueue(redis, keys).push(
        "welcome_email", {"email": "slow@example.com", "slow": True}
    )
    running = await start_consumer({"welcome_email": held_email}, {"email": 2}, grace=10)  # type: ignore[operator]
    await eventually(lambda: GATE.started == ["slow@example.com"], what="the job to start")
    running.stop.set()
    await asyncio.sleep(0.5)  # the stop is under way; the job is still held
    assert not running.task.done()
    GATE.release.set()
    await asyncio.wait_for(running.task, 5)
    assert GATE.finished == ["slow@example.com"]
    assert GATE.cancelled == []
    assert await redis.llen(keys.queue("email")) == 0


async def test_jobs_still_running_after_the_grace_period_are_returned_first_in_line(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = DirectQueue(redis, keys)
    slow = await queue.push("welcome_email", {"email": "slow@example.com", "slow": True})
    running = await start_consumer({"welcome_email": held_email}, {"email": 1}, grace=0.3)  # type: ignore[operator]
    await eventually(lambda: GATE.started == ["slow@example.com"], what="the job to start")
    later = await queue.push("welcome_email", {"email": "later@example.com"})
    running.stop.set()
    await asyncio.wait_for(running.task, 5)
    assert GATE.cancelled == ["slow@example.com"]
    # Returned to the pop end: it is fetched before the job queued after it.
    assert [decode(raw).id for raw in await redis.lrange(keys.queue("email"), 0, -1)] == [
        later.id,
        slow.id,
    ]


async def test_force_cancels_at_once_and_returns_the_jobs(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    job = await DirectQueue(redis, keys).push(
        "welcome_email", {"email": "slow@example.com", "slow": True}
    )
    running = await start_consumer({"welcome_email": held_email}, {"email": 1}, grace=60)  # type: ignore[operator]
    await eventually(lambda: GATE.started == ["slow@example.com"], what="the job to start")
    running.stop.set()
    running.force.set()
    await asyncio.wait_for(running.task, 3)
    assert GATE.cancelled == ["slow@example.com"]
    assert [decode(raw).id for raw in await redis.lrange(keys.queue("email"), 0, -1)] == [job.id]


async def _emails_sent(redis: aioredis.Redis, keys: Keys, count: int) -> bool:
    return int(await redis.hget(keys.stats, "emails_sent") or 0) == count


async def _llen(redis: aioredis.Redis, key: str, count: int) -> bool:
    return int(await redis.llen(key)) == count


async def test_consumer_survives_a_redis_restart(
    tmp_path: object, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses
    import subprocess
    import time
    from pathlib import Path

    from pipeline.embedded_redis import free_port, server_args, wait_until_ready

    port = free_port()
    directory = Path(str(tmp_path))

    def start_redis() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(server_args(port, directory), stdout=subprocess.DEVNULL)
        wait_until_ready(port, time.monotonic() + 10, process)
        return process

    server = start_redis()
    own = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{port}/0")
    client = consumer_client(own, max_connections=16)
    admin = aioredis.Redis.from_url(own.redis_url)
    keys = Keys(own.key_prefix)
    ctx = HandlerContext(client, keys, ConsoleEmailBackend(), own.email_from)
    consumer = Consumer(
        client, keys, HANDLERS, ctx, concurrency={"email": 2}, fetch_timeout=0.2, grace_period=1
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        queue = DirectQueue(admin, keys)
        payload = {"user_id": "u", "username": "alice", "email": "a@example.com"}
        await queue.push("welcome_email", payload)
        await eventually(lambda: _emails_sent(admin, keys, 1), what="the first job")
        server.terminate()
        server.wait(10)
        await eventually(lambda: "Redis unreachable" in caplog.text, what="the outage logged")
        server = start_redis()
        await admin.aclose()
        admin = aioredis.Redis.from_url(own.redis_url)
        await DirectQueue(admin, keys).push("welcome_email", payload)
        # The restarted Redis kept nothing (no persistence here): one job, processed.
        await eventually(lambda: _emails_sent(admin, keys, 1), what="a job after the restart")
        assert "Redis reachable again" in caplog.text
        assert caplog.text.count("queue email: Redis unreachable") == 1  # logged once per outage
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        await admin.aclose()
        server.terminate()
        server.wait(10)


_flaky_calls: list[str] = []


async def redis_down_once(ctx: HandlerContext, job: Job) -> None:
    _flaky_calls.append(job.id)
    if len(_flaky_calls) == 1:
        from redis.exceptions import ConnectionError as RedisConnectionError

        raise RedisConnectionError("Redis went away")


async def test_a_job_failed_by_redis_is_returned_not_dead_lettered(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    _flaky_calls.clear()
    job = await DirectQueue(redis, keys).push("welcome_email", {"email": "a@example.com"})
    await start_consumer({"welcome_email": redis_down_once})  # type: ignore[operator]
    await eventually(lambda: len(_flaky_calls) == 2, what="the job to run again")
    assert _flaky_calls == [job.id, job.id]
    assert await redis.llen(keys.dead) == 0
