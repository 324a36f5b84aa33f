"""The consumer runner in-process: dispatch, dead letters, concurrency, graceful drain."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from consumers.cli import consumer_parts
from consumers.runner import Consumer, retry_delay
from pipeline.connections import consumer_client
from pipeline.context import Context
from pipeline.jobs import Job, decode, new_job
from pipeline.keys import Keys
from pipeline.plan import resolve
from pipeline.queue import Ack, Broker, DirectQueue
from pipeline.registry import Handler
from pipeline.settings import Settings
from pipeline.stats import read_stats
from reactions.marketing import LIST
from reactions.welcome_email import EMAIL
from reactions.welcome_email.backends import ConsoleEmailBackend
from tests.helpers import REGISTRY, eventually, parse_metrics


@dataclass
class Gate:
    """Lets a test hold jobs in their handler and see which started and finished."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    #: The most jobs that were running at once.
    peak: int = 0


GATE = Gate()


async def held_email(ctx: Context, job: Job) -> None:
    """Stands in for welcome_email: runs until the test releases it (or it is cancelled)."""
    GATE.started.append(job.payload["email"])
    running = len(GATE.started) - len(GATE.finished) - len(GATE.cancelled)
    GATE.peak = max(GATE.peak, running)
    try:
        if job.payload.get("slow"):
            await GATE.release.wait()
    except asyncio.CancelledError:
        GATE.cancelled.append(job.payload["email"])
        raise
    GATE.finished.append(job.payload["email"])


_calls: list[tuple[str, int]] = []


async def failing(ctx: Context, job: Job) -> None:
    _calls.append((job.id, job.attempt))
    raise ValueError("smtp said no")


async def fails_once(ctx: Context, job: Job) -> None:
    _calls.append((job.id, job.attempt))
    if job.attempt == 0:
        raise ValueError("try again")


@dataclass
class Running:
    consumer: Consumer
    stop: asyncio.Event
    force: asyncio.Event
    task: asyncio.Task[None]


#: Fast everything: short fetch blocks, leases and retry delays.
FAST = {"FETCH_TIMEOUT": "0.2", "LEASE_TTL": "1", "RETRY_BASE_DELAY": "0.01"}


def build_consumer(
    settings: Settings, handlers: Mapping[str, Handler] | None = None, **overrides: object
) -> tuple[Consumer, aioredis.Redis]:
    """A consumer (and its client, for the caller to close) on ``settings`` and ``overrides``."""
    settings = dataclasses.replace(settings, **overrides)
    client = consumer_client(settings, max_connections=32)
    plan = resolve(settings)
    ctx, broker = consumer_parts(client, plan)  # as the consumer process builds them
    ctx[EMAIL] = ConsoleEmailBackend()
    return Consumer(broker, handlers or plan.registry.handlers(), ctx, plan), client


@pytest.fixture
async def start_consumer(
    make_settings: Callable[..., Settings], redis: aioredis.Redis
) -> AsyncIterator[object]:
    global GATE
    GATE = Gate()
    clients: list[aioredis.Redis] = []
    runs: list[Running] = []

    async def start(
        handlers: Mapping[str, Handler] | None = None,
        concurrency: Mapping[str, int] | None = None,
        grace: float = 5.0,
        env: Mapping[str, str] | None = None,
    ) -> Running:
        settings = make_settings({**FAST, **(env or {})})
        queues = dict(concurrency or {"email": 4, "marketing": 4, "profile": 4})
        consumer, client = build_consumer(
            settings,
            handlers,
            consumer_queues=tuple(queues),
            consumer_concurrency=queues,
            shutdown_grace_period=grace,
        )
        clients.append(client)
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


@pytest.mark.parametrize("mode", ["at-least-once", "at-most-once"])
async def test_processes_every_job_type_and_counts_each_once(
    start_consumer: object, redis: aioredis.Redis, keys: Keys, mode: str
) -> None:
    # The counters are the consumer's: each job done counts once, with its acknowledgement
    # (at-most-once, with the next pop).
    queue = DirectQueue(redis, keys, REGISTRY)
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
                "user_id": f"{i:032x}",
                "username": f"user{i}",
                "email": f"u{i}@example.com",
                "created_at": i,
            },
        )
    running = await start_consumer(env={"DELIVERY_MODE": mode})  # type: ignore[operator]

    async def all_done() -> bool:
        stats = await read_stats(redis, keys, REGISTRY)
        return (
            stats.counters["emails_sent"],
            stats.counters["marketing_list_updates"],
            stats.counters["profiles_generated"],
        ) == (5, 5, 5)

    await eventually(all_done, what="15 jobs processed")
    assert await redis.zcard(keys.of(LIST)) == 5
    running.stop.set()
    await asyncio.wait_for(running.task, 5)
    assert await all_done()  # and not one more on the way out


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
    ],
)
async def test_poison_jobs_go_to_dead_letters_and_the_consumer_keeps_going(
    start_consumer: object, redis: aioredis.Redis, keys: Keys, raw: bytes, reason: str
) -> None:
    await redis.lpush(keys.queue("email"), raw)
    await DirectQueue(redis, keys, REGISTRY).push(
        "welcome_email", {"user_id": "u1", "username": "alice", "email": "a@example.com"}
    )
    await start_consumer()  # type: ignore[operator]
    await eventually(lambda: _emails_sent(redis, keys, 1), what="the good job after the poison")
    entries = [orjson.loads(entry) for entry in await redis.lrange(keys.dead, 0, -1)]
    assert len(entries) == 1
    assert entries[0]["queue"] == "email"
    assert reason in entries[0]["reason"]
    assert entries[0]["job"] == raw.decode("utf-8", "backslashreplace")
    assert (await read_stats(redis, keys, REGISTRY)).dead_letter == 1


async def test_a_failing_job_is_retried_then_dead_lettered_with_its_error_and_attempts(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    _calls.clear()
    job = await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "a@example.com"})
    await start_consumer({"welcome_email": failing}, env={"JOB_MAX_ATTEMPTS": "3"})  # type: ignore[operator]
    await eventually(lambda: _llen(redis, keys.dead, 1), what="a dead letter")
    entry = orjson.loads(await redis.lindex(keys.dead, 0))
    assert _calls == [(job.id, 0), (job.id, 1), (job.id, 2)]
    assert entry["error"] == "ValueError: smtp said no"
    assert entry["reason"] == "failed 3 attempts; last: ValueError: smtp said no"
    assert (entry["id"], entry["type"], entry["attempts"]) == (job.id, "welcome_email", 3)
    assert decode(entry["job"].encode()).id == job.id
    assert await redis.zcard(keys.delayed("email")) == 0
    assert await redis.llen(keys.queue("email")) == 0


async def test_a_retry_waits_in_the_delayed_set_then_runs(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    _calls.clear()
    job = await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "a@example.com"})
    await start_consumer({"welcome_email": fails_once}, env={"RETRY_BASE_DELAY": "2"})  # type: ignore[operator]
    await eventually(lambda: _zcard(redis, keys.delayed("email"), 1), what="the retry scheduled")
    waiting = decode((await redis.zrange(keys.delayed("email"), 0, 0))[0])
    assert (waiting.id, waiting.attempt) == (job.id, 1)
    assert _calls == [(job.id, 0)]  # not run again before it is due
    await eventually(lambda: len(_calls) == 2, what="the retry to run")
    assert _calls == [(job.id, 0), (job.id, 1)]
    assert await redis.llen(keys.dead) == 0


@pytest.mark.parametrize("attempts", [1, 2, 3, 8, 20])
def test_retry_delay_is_exponential_with_jitter_and_capped(attempts: int) -> None:
    ceiling = min(60.0, 0.5 * 2 ** (attempts - 1))
    delays = [retry_delay(attempts, base=0.5, cap=60.0) for _ in range(200)]
    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
    assert len(set(delays)) > 1


async def test_a_job_over_its_timeout_counts_as_a_failed_attempt(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    await DirectQueue(redis, keys, REGISTRY).push(
        "welcome_email", {"email": "hang@example.com", "slow": True}
    )
    await start_consumer(  # type: ignore[operator]
        {"welcome_email": held_email},
        env={"JOB_TIMEOUT": "welcome_email=0.2", "JOB_MAX_ATTEMPTS": "2"},
    )
    await eventually(lambda: _llen(redis, keys.dead, 1), what="a dead letter")
    entry = orjson.loads(await redis.lindex(keys.dead, 0))
    assert entry["error"] == "timed out after 0.2 s"
    assert entry["attempts"] == 2
    assert GATE.started == ["hang@example.com", "hang@example.com"]


async def test_a_running_job_is_held_in_the_consumers_processing_list(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    job = await DirectQueue(redis, keys, REGISTRY).push(
        "welcome_email", {"email": "slow@example.com", "slow": True}
    )
    running = await start_consumer({"welcome_email": held_email})  # type: ignore[operator]
    await eventually(lambda: GATE.started == ["slow@example.com"], what="the job to start")
    held = keys.processing("email", running.consumer.consumer_id)
    assert [decode(raw).id for raw in await redis.lrange(held, 0, -1)] == [job.id]
    assert await redis.llen(keys.queue("email")) == 0
    GATE.release.set()
    await eventually(lambda: _llen(redis, held, 0), what="the ack")
    running.stop.set()
    await asyncio.wait_for(running.task, 5)
    # A graceful stop gives up the lease and the registration.
    assert await redis.exists(keys.lease(running.consumer.consumer_id)) == 0
    assert await redis.zcard(keys.consumers) == 0


async def test_at_most_once_holds_nothing_in_redis_while_a_job_runs(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    await DirectQueue(redis, keys, REGISTRY).push(
        "welcome_email", {"email": "slow@example.com", "slow": True}
    )
    running = await start_consumer(  # type: ignore[operator]
        {"welcome_email": held_email}, env={"DELIVERY_MODE": "at-most-once"}
    )
    await eventually(lambda: GATE.started == ["slow@example.com"], what="the job to start")
    assert await redis.llen(keys.processing("email", running.consumer.consumer_id)) == 0
    assert await redis.llen(keys.queue("email")) == 0
    GATE.release.set()
    await eventually(lambda: GATE.finished == ["slow@example.com"], what="the job")


async def test_jobs_of_a_consumer_whose_lease_expired_are_recovered_and_run(
    start_consumer: object,
    redis: aioredis.Redis,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A consumer that took two jobs and died: its lease is left to expire.
    dead = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="dead-1")
    await dead.heartbeat(0.05, {})
    queue = DirectQueue(redis, keys, REGISTRY)
    first = await queue.push("welcome_email", {"email": "first@example.com"})
    second = await queue.push("welcome_email", {"email": "second@example.com"})
    assert await dead.fetch("email", 1) is not None
    assert await dead.fetch("email", 1) is not None
    await eventually(lambda: _exists(redis, keys.lease("dead-1"), 0), what="the lease to expire")
    await start_consumer({"welcome_email": held_email}, {"email": 1})  # type: ignore[operator]
    await eventually(lambda: len(GATE.finished) == 2, what="the recovered jobs")
    assert GATE.finished == ["first@example.com", "second@example.com"]  # still oldest first
    assert "recovered consumer dead-1 (lease expired): 2 jobs returned" in caplog.text
    assert await redis.llen(keys.processing("email", "dead-1")) == 0
    assert await redis.hget(keys.deliveries, first.id) is None  # cleared by the ack
    assert await redis.hget(keys.deliveries, second.id) is None


async def test_a_held_job_whose_fetch_reply_was_lost_is_returned_and_run(
    start_consumer: object, redis: aioredis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_consumer({"welcome_email": held_email})  # type: ignore[operator]
    await eventually(lambda: _zcard(redis, keys.consumers, 1), what="the consumer's lease")
    # Redis moved a job into the consumer's list, but the reply never reached it.
    job = new_job("welcome_email", {"email": "orphan@example.com"})
    await redis.lpush(keys.processing("email", running.consumer.consumer_id), job.encode())
    await eventually(lambda: GATE.finished == ["orphan@example.com"], what="the orphan to run")
    assert "queue email: returned 1 held jobs this consumer was not running" in caplog.text


async def test_a_live_consumers_jobs_are_never_recovered(redis: aioredis.Redis, keys: Keys) -> None:
    alive = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="alive-1")
    await alive.heartbeat(30, {})
    await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "a@example.com"})
    assert await alive.fetch("email", 1) is not None
    sweeper = Broker(redis, keys, queues=REGISTRY.queues)
    assert await sweeper.expired_consumers() == []
    assert await sweeper.recover("alive-1", max_deliveries=3, forget_after=60) == (-1, 0)
    assert await redis.llen(keys.processing("email", "alive-1")) == 1


async def test_a_job_that_keeps_killing_its_consumer_is_dead_lettered_after_max_deliveries(
    redis: aioredis.Redis, keys: Keys
) -> None:
    job = await DirectQueue(redis, keys, REGISTRY).push("generate_profile", {"user_id": "u"})
    sweeper = Broker(redis, keys, queues=REGISTRY.queues)
    for delivery in range(1, 4):
        victim = Broker(redis, keys, queues=REGISTRY.queues, consumer_id=f"victim-{delivery}")
        await victim.heartbeat(0.05, {})
        assert decode(await victim.fetch("profile", 1) or b"").id == job.id
        await eventually(lambda v=victim: _exists(redis, keys.lease(v.consumer_id), 0))
        returned, dead = await sweeper.recover(
            victim.consumer_id, max_deliveries=3, forget_after=60
        )
        assert (returned, dead) == ((1, 0) if delivery < 3 else (0, 1))
    assert await redis.llen(keys.queue("profile")) == 0
    entry = orjson.loads(await redis.lindex(keys.dead, 0))
    assert entry["deliveries"] == 3
    assert entry["id"] == job.id
    assert entry["reason"] == "delivered 3 times, each to a consumer that died holding it"
    assert decode(entry["job"].encode()) == job
    assert await redis.hget(keys.deliveries, job.id) is None


async def test_settling_a_job_no_longer_held_does_nothing(
    redis: aioredis.Redis, keys: Keys
) -> None:
    broker = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="c1")
    job = await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "a@example.com"})
    raw = await broker.fetch("email", 1)
    assert raw is not None
    await redis.delete(keys.processing("email", "c1"))  # as a recovery would
    assert await broker.return_job("email", raw) is False
    assert await broker.retry("email", raw, job, 1.0) is False
    assert await broker.take("email", 0, [Ack(raw, job.id, "emails_sent")]) == ([], 0)
    # Not counted here: the consumer that holds the job now counts it when it acks it.
    assert int(await redis.hget(keys.stats, "emails_sent") or 0) == 0
    assert await redis.llen(keys.queue("email")) == 0
    assert await redis.zcard(keys.delayed("email")) == 0


async def test_due_retries_are_promoted_to_the_head_earliest_first(
    redis: aioredis.Redis, keys: Keys
) -> None:
    broker = Broker(redis, keys, queues=REGISTRY.queues, mode="at-most-once")
    waiting = await DirectQueue(redis, keys, REGISTRY).push(
        "welcome_email", {"email": "w@example.com"}
    )
    jobs = [new_job("welcome_email", {"email": f"retry{i}@example.com"}) for i in range(3)]
    # Three jobs to retry: due in 20 ms, 10 ms and a minute.
    for job, delay in zip(jobs, [0.02, 0.01, 60], strict=True):
        assert await broker.retry("email", job.encode(), job, delay)
    await eventually(lambda: _promoted(broker, 2), what="two due retries")
    order = [decode(raw).id for raw in reversed(await redis.lrange(keys.queue("email"), 0, -1))]
    assert order == [jobs[1].id, jobs[0].id, waiting.id]  # the next to run first
    assert await redis.zcard(keys.delayed("email")) == 1


async def test_latency_samples_reach_the_stats(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = DirectQueue(redis, keys, REGISTRY)
    for i in range(4):
        await queue.push("welcome_email", {"email": f"u{i}@example.com"})
    running = await start_consumer({"welcome_email": held_email})  # type: ignore[operator]
    await eventually(lambda: len(GATE.finished) == 4, what="four jobs")
    running.stop.set()
    await asyncio.wait_for(running.task, 5)  # the last samples are written on the way out
    latency = (await read_stats(redis, keys, REGISTRY)).latency["email"]
    assert latency.samples == 4
    assert latency.wait_ms.p50 is not None and latency.wait_ms.p99 is not None
    assert 0 <= latency.wait_ms.p50 <= latency.wait_ms.p99
    assert latency.run_ms.p50 is not None and latency.run_ms.p99 is not None
    assert 0 <= latency.run_ms.p50 <= latency.run_ms.p99
    assert (await read_stats(redis, keys, REGISTRY)).latency["profile"].samples == 0


async def test_a_slow_job_does_not_block_fetching(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = DirectQueue(redis, keys, REGISTRY)
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
    queue = DirectQueue(redis, keys, REGISTRY)
    for i in range(5):
        await queue.push("welcome_email", {"email": f"slow{i}@example.com", "slow": True})
    running = await start_consumer({"welcome_email": held_email}, {"email": 3})  # type: ignore[operator]
    await eventually(lambda: len(GATE.started) == 3, what="three jobs started")
    # The other two stay queued, not popped and held: its slots are full.
    held = keys.processing("email", running.consumer.consumer_id)
    assert (await redis.llen(keys.queue("email")), await redis.llen(held)) == (2, 3)
    GATE.release.set()
    await eventually(lambda: len(GATE.finished) == 5, what="every job")
    assert GATE.peak == 3  # never more than three at once, from start to end


async def test_stop_lets_in_flight_jobs_finish_within_the_grace_period(
    start_consumer: object, redis: aioredis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    await DirectQueue(redis, keys, REGISTRY).push(
        "welcome_email", {"email": "slow@example.com", "slow": True}
    )
    running = await start_consumer({"welcome_email": held_email}, {"email": 2}, grace=10)  # type: ignore[operator]
    await eventually(lambda: GATE.started == ["slow@example.com"], what="the job to start")
    with caplog.at_level(logging.INFO, logger="consumers.runner"):
        running.stop.set()
        await eventually(
            lambda: "waiting up to" in caplog.text, what="the drain to wait for the job"
        )
    assert not running.task.done()
    GATE.release.set()
    await asyncio.wait_for(running.task, 5)
    assert GATE.finished == ["slow@example.com"]
    assert GATE.cancelled == []
    assert await redis.llen(keys.queue("email")) == 0


async def test_jobs_still_running_after_the_grace_period_are_returned_first_in_line(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = DirectQueue(redis, keys, REGISTRY)
    slow = await queue.push("welcome_email", {"email": "slow@example.com", "slow": True})
    running = await start_consumer({"welcome_email": held_email}, {"email": 1}, grace=0.3)  # type: ignore[operator]
    await eventually(lambda: GATE.started == ["slow@example.com"], what="the job to start")
    later = await queue.push("welcome_email", {"email": "later@example.com"})
    running.stop.set()
    await asyncio.wait_for(running.task, 5)
    assert GATE.cancelled == ["slow@example.com"]
    # Returned to the pop end: it is fetched before the job queued after it. A shutdown's
    # cancellation is not a failed attempt: the job goes back as it came.
    assert await redis.lrange(keys.queue("email"), 0, -1) == [later.encode(), slow.encode()]


async def test_force_cancels_at_once_and_returns_the_jobs(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    job = await DirectQueue(redis, keys, REGISTRY).push(
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


async def _zcard(redis: aioredis.Redis, key: str, count: int) -> bool:
    return int(await redis.zcard(key)) == count


async def _exists(redis: aioredis.Redis, key: str, count: int) -> bool:
    return int(await redis.exists(key)) == count


async def _promoted(broker: Broker, count: int) -> bool:
    await broker.promote(["email"])
    return int(await broker.redis.llen(broker.keys.queue("email"))) == count + 1


async def test_consumer_survives_a_redis_restart(
    tmp_path: object, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses
    import subprocess
    import time
    from pathlib import Path

    from devtools.embedded_redis import free_port, wait_until_ready
    from tests.helpers import suite_server_args

    port = free_port()
    directory = Path(str(tmp_path))

    def start_redis() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(suite_server_args(port, directory), stdout=subprocess.DEVNULL)
        wait_until_ready(port, time.monotonic() + 10, process)
        return process

    server = start_redis()
    own = dataclasses.replace(
        settings,
        redis_url=f"redis://127.0.0.1:{port}/0",
        consumer_queues=("email",),
        fetch_timeout=0.2,
        shutdown_grace_period=1,
    )
    consumer, client = build_consumer(own)
    admin = aioredis.Redis.from_url(own.redis_url)
    keys = Keys(own.key_prefix)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        queue = DirectQueue(admin, keys, REGISTRY)
        payload = {"user_id": "u", "username": "alice", "email": "a@example.com"}
        await queue.push("welcome_email", payload)
        await eventually(lambda: _emails_sent(admin, keys, 1), what="the first job")
        server.terminate()
        server.wait(10)
        await eventually(lambda: "Redis unavailable (" in caplog.text, what="the outage logged")
        server = start_redis()
        await admin.aclose()
        admin = aioredis.Redis.from_url(own.redis_url)
        await DirectQueue(admin, keys, REGISTRY).push("welcome_email", payload)
        # The restarted Redis kept nothing (no persistence here): one job, processed.
        await eventually(lambda: _emails_sent(admin, keys, 1), what="a job after the restart")
        assert "Redis available again" in caplog.text
        assert caplog.text.count("); retrying with backoff") == 1  # logged once per outage
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        await admin.aclose()
        server.terminate()
        server.wait(10)


_flaky_calls: list[str] = []


async def redis_down_once(ctx: Context, job: Job) -> None:
    _flaky_calls.append(job.id)
    if len(_flaky_calls) == 1:
        raise RedisConnectionError("Redis went away")


async def test_a_job_failed_by_redis_is_returned_not_dead_lettered(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    _flaky_calls.clear()
    job = await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "a@example.com"})
    await start_consumer({"welcome_email": redis_down_once})  # type: ignore[operator]
    await eventually(lambda: len(_flaky_calls) == 2, what="the job to run again")
    assert _flaky_calls == [job.id, job.id]
    assert await redis.llen(keys.dead) == 0


async def test_dead_letters_requeue_all_skips_what_cannot_be_decoded_and_purge_empties(
    redis: aioredis.Redis, keys: Keys
) -> None:
    from pipeline.dead import DeadLetter, DeadLetters

    jobs = [
        new_job("welcome_email", {"email": "a@example.com"}),
        new_job("generate_profile", {"user_id": "u"}),
    ]
    for job in jobs:
        retried = dataclasses.replace(job, attempt=4)
        await redis.lpush(
            keys.dead, DeadLetter.for_job("x", retried.encode(), "failed", job=retried).encode()
        )
    await redis.lpush(
        keys.dead, DeadLetter.for_job("email", b"not json", "undecodable job").encode()
    )
    dead = DeadLetters(redis, keys, REGISTRY)
    assert [entry.job_id for entry in await dead.list(limit=2)] == [None, jobs[1].id]
    assert await dead.requeue() == (2, 1)
    back = [decode(raw) for raw in await redis.lrange(keys.queue("email"), 0, -1)]
    back += [decode(raw) for raw in await redis.lrange(keys.queue("profile"), 0, -1)]
    assert [(job.id, job.attempt) for job in back] == [(jobs[0].id, 0), (jobs[1].id, 0)]
    assert await dead.count() == 1  # the undecodable one stays
    assert await dead.requeue(jobs[0].id) == (0, 0)  # already requeued
    assert await dead.purge() == 1
    assert await dead.count() == 0


async def test_jobs_finishing_apart_are_acked_by_one_take_and_an_idle_loop_takes_at_once(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    """Under load a fetch loop waits (up to its linger) for its running jobs to finish before
    it takes again, so three jobs finishing in three different ticks cost one take; with
    nothing running it takes at once, whatever the linger. (The linger is made long here so
    that the test does not depend on this machine's speed.)"""
    gates = {f"j{i}@example.com": asyncio.Event() for i in range(6)}

    async def gated(ctx: Context, job: Job) -> None:
        await gates[job.payload["email"]].wait()

    queue = DirectQueue(redis, keys, REGISTRY)
    for email in gates:
        await queue.push("welcome_email", {"user_id": "u", "username": "u", "email": email})
    running = await start_consumer(  # type: ignore[operator]
        handlers={"welcome_email": gated}, concurrency={"email": 3}
    )
    running.consumer.take_linger = 60.0
    takes = _record_takes(running.consumer)
    held = keys.processing("email", running.consumer.consumer_id)
    await eventually(lambda: _llen(redis, held, 3), what="three jobs taken")
    assert takes == [(3, 0)]
    for email in list(gates)[:3]:  # the three finish in three different ticks
        gates[email].set()
        for _ in range(5):
            await asyncio.sleep(0)
    await eventually(lambda: len(takes) == 2, what="the next take")
    assert takes[1] == (3, 3)  # one round trip acked all three and took three more
    for event in gates.values():  # nothing is left running: the next take is at once
        event.set()
    await eventually(lambda: _llen(redis, held, 0), what="the last acks, without the linger")


async def test_take_acks_finished_jobs_and_takes_a_batch_oldest_first(
    redis: aioredis.Redis, keys: Keys
) -> None:
    broker = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="c1")
    queue = DirectQueue(redis, keys, REGISTRY)
    jobs = [await queue.push("welcome_email", {"email": f"u{i}@example.com"}) for i in range(5)]
    taken, found = await broker.take("email", 3)
    assert ([decode(raw).id for raw in taken], found) == ([j.id for j in jobs[:3]], 0)
    held = keys.processing("email", "c1")
    # Both lists as three LMOVEs would leave them: the oldest taken nearest the pop end of
    # the processing list (recovery puts jobs back in that order), the rest still queued.
    ids = [decode(raw).id for raw in await redis.lrange(held, 0, -1)]
    assert ids == [j.id for j in reversed(jobs[:3])]
    ids = [decode(raw).id for raw in await redis.lrange(keys.queue("email"), 0, -1)]
    assert ids == [jobs[4].id, jobs[3].id]
    # Two finished: acked in the same round trip that takes the rest.
    acks = [Ack(raw, decode(raw).id, "emails_sent") for raw in taken[:2]]
    await redis.hset(keys.deliveries, jobs[0].id, 1)  # as if it had been recovered once
    taken, found = await broker.take("email", 10, acks)
    assert ([decode(raw).id for raw in taken], found) == ([j.id for j in jobs[3:]], 2)
    assert await redis.llen(held) == 3  # the third of the first batch and the last two
    assert await redis.hget(keys.deliveries, jobs[0].id) is None
    assert await redis.hget(keys.stats, "emails_sent") == b"2"  # each ack counted
    assert await broker.take("email", 10) == ([], 0)


async def test_an_ack_counts_its_job_once_however_often_it_is_sent(
    redis: aioredis.Redis, keys: Keys
) -> None:
    broker = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="c1")
    queue = DirectQueue(redis, keys, REGISTRY)
    for i in range(3):
        await queue.push("welcome_email", {"email": f"u{i}@example.com"})
    taken, _ = await broker.take("email", 3)
    done = [Ack(raw, decode(raw).id, "emails_sent") for raw in taken]
    # Two kinds of job on one queue: each ack counts under its own counter, or none.
    done[1] = done[1]._replace(counter="other_jobs")
    done[2] = done[2]._replace(counter="")
    assert await broker.take("email", 0, done) == ([], 3)
    # Sent again (a round trip whose reply was lost, so the runner sends its acks again):
    # they find nothing to remove, and count nothing more.
    assert await broker.take("email", 0, done) == ([], 0)
    assert await redis.hgetall(keys.stats) == {b"emails_sent": b"1", b"other_jobs": b"1"}


async def test_an_ack_writes_its_done_marker_only_when_its_job_was_recovered(
    redis: aioredis.Redis, keys: Keys
) -> None:
    broker = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="c1", done_ttl=600)
    queue = DirectQueue(redis, keys, REGISTRY)
    for i in range(3):
        await queue.push("welcome_email", {"email": f"u{i}@example.com"})
    taken, _ = await broker.take("email", 3)
    ids = [decode(raw).id for raw in taken]
    # The second was recovered from this consumer meanwhile and is another's now: its ack
    # finds no job, but the email it marks went out, so its marker is written for the
    # delivery that holds it. The others' acks remove their jobs, which ends their
    # deliveries: no marker is kept for them.
    await redis.lrem(keys.processing("email", "c1"), 1, taken[1])
    acks = [
        Ack(raw, id_, "emails_sent", keys.done(id_)) for raw, id_ in zip(taken, ids, strict=True)
    ]
    acks.append(Ack(b"not held", "x" * 32, "emails_sent"))  # no marker: none written
    assert await broker.take("email", 0, acks) == ([], 2)
    assert await redis.get(keys.done(ids[1])) == b"1"
    assert 590 < await redis.ttl(keys.done(ids[1])) <= 600
    assert not await redis.exists(keys.done(ids[0]), keys.done(ids[2]), keys.done("x" * 32))
    assert await redis.hget(keys.stats, "emails_sent") == b"2"
    assert await redis.llen(keys.processing("email", "c1")) == 0


async def test_a_settlement_writes_the_done_marker_in_either_mode(
    redis: aioredis.Redis, keys: Keys
) -> None:
    queue = DirectQueue(redis, keys, REGISTRY)
    for mode in ("at-least-once", "at-most-once"):
        broker = Broker(redis, keys, queues=REGISTRY.queues, mode=mode, done_ttl=600)  # type: ignore[arg-type]
        jobs = [await queue.push("welcome_email", {"email": f"{mode}{i}@x.org"}) for i in range(4)]
        taken, _ = await broker.take("email", 4)
        retried = dataclasses.replace(decode(taken[0]), attempt=1)
        assert await broker.retry("email", taken[0], retried, 60, marker=keys.done(jobs[0].id))
        assert await broker.dead_letter(
            "email", taken[1], b"{}", jobs[1].id, marker=keys.done(jobs[1].id)
        )
        assert await broker.return_job("email", taken[2], marker=keys.done(jobs[2].id))
        # The last acknowledged: it is never delivered again (removed from this consumer's
        # list, or popped), so no marker is kept for it.
        ack = Ack(taken[3], jobs[3].id, "", keys.done(jobs[3].id))
        await broker.take("email", 0, [ack])
        for job in jobs[:3]:
            assert 590 < await redis.ttl(keys.done(job.id)) <= 600, (mode, job)
        assert not await redis.exists(keys.done(jobs[3].id)), mode
        await redis.delete(keys.queue("email"))


async def test_at_most_once_acks_count_with_the_next_pop(redis: aioredis.Redis, keys: Keys) -> None:
    broker = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="c1", mode="at-most-once")
    queue = DirectQueue(redis, keys, REGISTRY)
    pushed = [
        await queue.push("marketing_signup", {"email": f"u{i}@example.com"}) for i in range(2)
    ]
    taken, _ = await broker.take("marketing", 1)
    acks = [Ack(raw, decode(raw).id, "marketing_list_updates") for raw in taken]
    taken, found = await broker.take("marketing", 5, acks)
    assert ([decode(raw).id for raw in taken], found) == ([pushed[1].id], 1)
    assert await redis.hget(keys.stats, "marketing_list_updates") == b"1"
    # Nothing to take: the count still goes (a stop's last acks).
    await broker.take("marketing", 0, [Ack(taken[0], pushed[1].id, "marketing_list_updates")])
    assert await redis.hget(keys.stats, "marketing_list_updates") == b"2"


async def test_take_at_most_once_pops_a_batch_and_holds_nothing(
    redis: aioredis.Redis, keys: Keys
) -> None:
    broker = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="c1", mode="at-most-once")
    queue = DirectQueue(redis, keys, REGISTRY)
    jobs = [await queue.push("welcome_email", {"email": f"u{i}@example.com"}) for i in range(3)]
    taken, _ = await broker.take("email", 2)
    assert [decode(raw).id for raw in taken] == [jobs[0].id, jobs[1].id]
    assert await redis.llen(keys.processing("email", "c1")) == 0
    assert await redis.llen(keys.queue("email")) == 1


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "a" * 40, 2, b"k1", "k2", "ü", 1.5, 1e-05, 123456789012, -1, b"\x00\xff"),
        ("SET", "k", "v", "PX", 5000),
        ("CLIENT LIST",),
        ("BLMOVE", "a", "b", 1.0, "RIGHT", "LEFT"),
    ],
)
def test_hiredis_packing_sends_the_same_bytes_as_redis_py(args: tuple[object, ...]) -> None:
    from redis.asyncio.connection import Connection

    from pipeline.connections import HiredisConnection

    packed = b"".join(HiredisConnection().pack_command(*args))
    assert packed == b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h:6379/0", "HiredisConnection"),
        ("rediss://h:6380/0", "HiredisSSLConnection"),
        ("unix:///tmp/redis.sock", "HiredisUnixConnection"),
    ],
)
def test_each_scheme_keeps_its_kind_of_connection(url: str, expected: str) -> None:
    from pipeline.connections import connection_class

    assert connection_class(url).__name__ == expected


class SlowSettlingBroker(Broker):
    """Settles a retry slowly, as through a Redis outage (the Redis is real)."""

    async def retry(
        self, queue: str, raw: bytes, retried: Job, delay: float, *, marker: str = ""
    ) -> bool:
        await asyncio.sleep(0.5)
        return await super().retry(queue, raw, retried, delay, marker=marker)


async def test_settling_a_failed_job_is_not_cut_short_by_its_timeout(
    make_settings: Callable[..., Settings], redis: aioredis.Redis, keys: Keys
) -> None:
    _calls.clear()
    settings = make_settings(
        {**FAST, "JOB_TIMEOUT": "0.1", "RETRY_BASE_DELAY": "60", "CONSUMER_QUEUES": "email"}
    )
    client = consumer_client(settings, max_connections=16)
    ctx = Context(client, settings)
    consumer = Consumer(
        SlowSettlingBroker(client, keys, queues=REGISTRY.queues),
        {"welcome_email": failing},
        ctx,
        resolve(settings),
    )
    job = await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "a@example.com"})
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await eventually(lambda: _zcard(redis, keys.delayed("email"), 1), what="the retry")
        [waiting] = await redis.zrange(keys.delayed("email"), 0, -1)
        assert (decode(waiting).id, decode(waiting).attempt) == (job.id, 1)
        assert await redis.llen(keys.processing("email", consumer.consumer_id)) == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()


async def test_the_heartbeat_says_when_the_lease_had_lapsed(
    redis: aioredis.Redis, keys: Keys
) -> None:
    broker = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="c1")
    assert await broker.heartbeat(30, {"pid": 1}) is False  # nothing held before
    assert await broker.heartbeat(30, {"pid": 1}) is True
    await redis.delete(keys.lease("c1"))  # expired meanwhile
    assert await broker.heartbeat(30, {"pid": 1}) is False
    assert await redis.zscore(keys.consumers, "c1") is not None


async def test_a_dead_consumer_is_forgotten_only_after_forget_after(
    redis: aioredis.Redis, keys: Keys
) -> None:
    dead = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="gone")
    await dead.heartbeat(0.05, {})
    await eventually(lambda: _exists(redis, keys.lease("gone"), 0), what="the lease to expire")
    sweeper = Broker(redis, keys, queues=REGISTRY.queues)
    assert await sweeper.recover("gone", max_deliveries=3, forget_after=60) == (0, 0)
    assert await redis.zscore(keys.consumers, "gone") is not None  # still looked at
    assert await sweeper.recover("gone", max_deliveries=3, forget_after=0) == (0, 0)
    assert await redis.zscore(keys.consumers, "gone") is None


async def test_after_an_outage_the_sweeper_first_lets_live_consumers_renew(
    make_settings: Callable[..., Settings], redis: aioredis.Redis, keys: Keys
) -> None:
    dead = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="dead-1")
    await dead.heartbeat(0.05, {})
    await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "a@example.com"})
    assert await dead.fetch("email", 1) is not None
    await eventually(lambda: _exists(redis, keys.lease("dead-1"), 0), what="the lease to expire")
    consumer, client = build_consumer(
        make_settings({**FAST, "LEASE_TTL": "2"}),
        {"welcome_email": held_email},
        consumer_queues=("email",),
    )
    # As if this consumer had just seen Redis come back from an outage.
    outage = consumer._outage
    outage.failed(RedisConnectionError("down"))
    outage.ok()
    held_back: list[float] = []  # each time the sweeper found the quiet period still running
    quiet_for = outage.quiet_for

    def noted(seconds: float) -> bool:
        quiet = quiet_for(seconds)
        if not quiet:
            held_back.append(seconds)
        return quiet

    outage.quiet_for = noted  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        # The sweeper's first rounds (one at start-up) hold back for a lease period...
        await eventually(lambda: len(held_back) >= 2, what="two sweeps held back")
        assert held_back == [2.0] * len(held_back)
        assert await redis.llen(keys.processing("email", "dead-1")) == 1
        # ... and once it has passed, the dead consumer's job is recovered.
        await eventually(lambda: _llen(redis, keys.processing("email", "dead-1"), 0))
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()


def _count(consumer: Consumer, name: str, **labels: str) -> float:
    metrics = parse_metrics(consumer.metrics.exposition().decode())
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_retries_and_dead_letters_are_counted_by_outcome(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    _calls.clear()
    await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "a@example.com"})
    running = await start_consumer({"welcome_email": failing}, env={"JOB_MAX_ATTEMPTS": "3"})  # type: ignore[operator]
    await eventually(lambda: _llen(redis, keys.dead, 1), what="a dead letter")
    consumer = running.consumer
    await eventually(
        lambda: (
            _count(consumer, "signup_jobs_total", type="welcome_email", outcome="dead_lettered")
            == 1
        ),
        what="the dead letter to be counted",
    )
    jobs = "signup_jobs_total"
    assert _count(consumer, jobs, type="welcome_email", outcome="retried") == 2
    assert _count(consumer, jobs, type="welcome_email", outcome="succeeded") == 0
    assert _count(consumer, "signup_job_run_seconds_count", type="welcome_email") == 3
    assert _count(consumer, "signup_job_queue_wait_seconds_count", queue="email") == 3


async def test_jobs_recovered_from_a_dead_consumer_are_counted(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    dead = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="dead-2")
    await dead.heartbeat(0.05, {})
    await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "first@example.com"})
    assert await dead.fetch("email", 1) is not None
    await eventually(lambda: _exists(redis, keys.lease("dead-2"), 0), what="the lease to expire")
    running = await start_consumer({"welcome_email": held_email}, {"email": 1})  # type: ignore[operator]
    await eventually(lambda: len(GATE.finished) == 1, what="the recovered job")
    consumer = running.consumer
    assert _count(consumer, "signup_jobs_recovered_total", outcome="returned") == 1
    assert _count(consumer, "signup_jobs_recovered_total", outcome="dead_lettered") == 0


def _record_takes(consumer: Consumer) -> list[tuple[int, int]]:
    """Each take the consumer's broker makes from now on, as (count asked, acks sent)."""
    broker = consumer._broker
    takes: list[tuple[int, int]] = []
    real_take = broker.take

    async def take(queue: str, count: int, acks: Any = ()) -> Any:
        takes.append((count, len(acks)))
        return await real_take(queue, count, acks)

    broker.take = take
    return takes


async def _blocked(redis: aioredis.Redis, count: int) -> bool:
    return int((await redis.info("clients"))["blocked_clients"]) == count


async def test_a_loop_woken_by_its_blocking_fetch_waits_its_linger_then_starts_all_together(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    """An idle loop's blocking fetch wakes with the first job of a commit. It waits its wake
    linger (made long here, so the test does not depend on this machine's speed), then takes
    the rest of that commit and of the commits that came meanwhile, in one take, and starts
    them all together, oldest first."""
    started: list[str] = []
    release = asyncio.Event()

    async def gated(ctx: Context, job: Job) -> None:
        started.append(job.payload["email"])
        await release.wait()

    running = await start_consumer(  # type: ignore[operator]
        handlers={"welcome_email": gated}, concurrency={"email": 5}
    )
    running.consumer.take_linger = 60.0
    running.consumer.wake_linger = 1.0
    takes = _record_takes(running.consumer)
    await eventually(lambda: _blocked(redis, 1), what="the fetch loop blocking on its empty queue")
    takes.clear()
    emails = [f"b{i}@example.com" for i in range(5)]
    jobs = [new_job("welcome_email", {"user_id": "u", "username": "u", "email": e}) for e in emails]
    await redis.lpush(keys.queue("email"), *(job.encode() for job in jobs[:3]))  # one commit
    await eventually(lambda: _blocked(redis, 0), what="the fetch to wake")
    await redis.lpush(keys.queue("email"), *(job.encode() for job in jobs[3:]))  # the next
    assert started == []  # the woken job waits for the linger
    await eventually(lambda: len(started) == 5, what="all five started")
    assert started == emails
    assert takes == [(4, 0)]  # the rest of both commits in one take
    release.set()
    held = keys.processing("email", running.consumer.consumer_id)
    await eventually(lambda: _llen(redis, held, 0), what="all five acked")


async def _recording_consumer(start_consumer: object, wake_linger: float) -> tuple[Any, list[str]]:
    """A consumer of the email queue whose handler notes each job id it runs, in order."""
    ran: list[str] = []

    async def record(ctx: Context, job: Job) -> None:
        ran.append(job.id)

    running = await start_consumer(  # type: ignore[operator]
        handlers={"welcome_email": record}, concurrency={"email": 2}
    )
    running.consumer.wake_linger = wake_linger
    return running, ran


async def test_a_stop_during_the_wake_linger_runs_the_job_fetched(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    running, ran = await _recording_consumer(start_consumer, wake_linger=60.0)
    await eventually(lambda: _blocked(redis, 1), what="the fetch loop blocking on its empty queue")
    job = await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "a@x.org"})
    await eventually(lambda: _blocked(redis, 0), what="the fetch to wake")
    running.stop.set()
    await asyncio.wait_for(running.task, 10)  # not the linger's 60 s
    assert ran == [job.id]
    assert await redis.llen(keys.processing("email", running.consumer.consumer_id)) == 0
    assert await redis.llen(keys.queue("email")) == 0


async def test_a_take_failing_after_a_wake_still_runs_the_job_fetched(
    start_consumer: object, redis: aioredis.Redis, keys: Keys
) -> None:
    """The blocking fetch moved a job into the processing list; the take after the wake
    linger fails. The job fetched runs, once, and is acknowledged: it is neither dropped nor
    returned to its queue as an orphan."""
    running, ran = await _recording_consumer(start_consumer, wake_linger=0.05)
    broker = running.consumer._broker
    real_take, real_return = broker.take, broker.return_job
    failing, returned = [False], []

    async def take(queue: str, count: int, acks: Any = ()) -> Any:
        if failing[0]:
            failing[0] = False
            raise RedisConnectionError("Redis went away")
        return await real_take(queue, count, acks)

    async def return_job(queue: str, raw: bytes, *, marker: str = "") -> bool:
        returned.append(raw)
        return await real_return(queue, raw, marker=marker)

    broker.take, broker.return_job = take, return_job
    await eventually(lambda: _blocked(redis, 1), what="the fetch loop blocking on its empty queue")
    failing[0] = True  # the next take: the one after the wake
    job = await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "a@x.org"})
    await eventually(lambda: ran == [job.id], what="the job fetched to run")
    held = keys.processing("email", running.consumer.consumer_id)
    await eventually(lambda: _llen(redis, held, 0), what="its acknowledgement")
    assert not failing[0]  # the take did fail
    assert ran == [job.id] and returned == []


class RecordingEmail:
    """An email backend that keeps what it was asked to send (the handler is the real one)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, message: Any) -> None:
        self.sent.append(str(message["To"]))


async def test_an_emails_done_marker_is_written_when_its_job_was_recovered_meanwhile(
    start_consumer: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    """The welcome email's marker goes with the job's acknowledgement, not in a round trip
    of its own, and is kept only if the job is gone by then. Here the first acknowledgement
    fails (Redis away) and, before it is sent again, the job is recovered from this consumer
    (as after a lapsed lease) and queued again: the acknowledgement sent again writes the
    marker, and the redelivery finds the email sent. The redelivery's own acknowledgement
    removes its job and keeps no marker a second time (it is still there, for its
    ``IDEMPOTENCY_TTL``)."""
    running = await start_consumer(concurrency={"email": 4})
    email = running.consumer._context[EMAIL] = RecordingEmail()
    broker = running.consumer._broker
    held = keys.processing("email", running.consumer.consumer_id)
    real_take, failed = broker.take, []

    async def take(queue: str, count: int, acks: Any = ()) -> Any:
        if any(ack.marker for ack in acks) and not failed:
            failed.append([ack.marker for ack in acks])
            for ack in acks:  # recovered meanwhile: back at the head of its queue
                await redis.lrem(held, 1, ack.raw)
                await redis.rpush(keys.queue("email"), ack.raw)
            raise RedisConnectionError("Redis went away")
        return await real_take(queue, count, acks)

    broker.take = take
    job = await DirectQueue(redis, keys, REGISTRY).push(
        "welcome_email", {"user_id": "1" * 32, "username": "ann", "email": "ann@example.com"}
    )

    async def acknowledged() -> bool:
        emails = await redis.hget(keys.stats, "emails_sent")
        return emails == b"1" and await _llen(redis, held, 0)

    await eventually(acknowledged, what="the redelivery acknowledged")
    assert failed == [[keys.done(job.id)]]  # the first ack carried the marker, and failed
    assert await _llen(redis, keys.queue("email"), 0)
    assert email.sent == ["ann@example.com"]  # once: the redelivery found the marker
    assert await redis.exists(keys.done(job.id)) == 1


async def test_an_acknowledgement_that_removes_its_job_keeps_no_done_marker(
    start_consumer: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    running = await start_consumer(concurrency={"email": 4})
    email = running.consumer._context[EMAIL] = RecordingEmail()
    queue = DirectQueue(redis, keys, REGISTRY)
    jobs = [
        await queue.push("welcome_email", {"user_id": f"{i}" * 32, "username": f"u{i}",
                                           "email": f"u{i}@example.com"})
        for i in range(3)
    ]  # fmt: skip
    held = keys.processing("email", running.consumer.consumer_id)

    async def acknowledged() -> bool:
        emails = await redis.hget(keys.stats, "emails_sent")
        return emails == b"3" and await _llen(redis, held, 0)

    await eventually(acknowledged, what="the three acknowledged")
    assert sorted(email.sent) == ["u0@example.com", "u1@example.com", "u2@example.com"]
    assert await redis.exists(*(keys.done(job.id) for job in jobs)) == 0


_marks: list[tuple[int, int]] = []


async def marks_then_fails(ctx: Context, job: Job) -> None:
    """Marks its job done, then fails: the first attempt only."""
    _marks.append((job.attempt, await ctx.is_done(job.id)))
    if job.attempt == 0:
        await ctx.mark_done(job.id)
        raise ValueError("failed after its effect")


async def test_a_mark_set_before_the_handler_failed_goes_with_the_retry(
    start_consumer: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    _marks.clear()
    await start_consumer({"welcome_email": marks_then_fails}, concurrency={"email": 2})
    job = await DirectQueue(redis, keys, REGISTRY).push("welcome_email", {"email": "a@x.org"})
    await eventually(lambda: len(_marks) == 2, what="the retry to run")
    assert _marks == [(0, 0), (1, 1)]  # the retry found the mark its first attempt set
    assert await redis.exists(keys.done(job.id)) == 1
