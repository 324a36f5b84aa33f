"""Redis refusing to serve, each way a real server does: a 503 with nothing written in the web,
and in the consumers a job put back untried and run once Redis serves again.

Each refusal is imposed on a server of its own (the kind this run tests), the way an operator
or an incident would: ``maxmemory`` reached with eviction off (OOM), a replica (READONLY),
``min-replicas-to-write`` unmet (NOREPLICAS), a failed background save (MISCONF), a script
running past ``busy-reply-threshold`` (BUSY), and a restart still loading its data (LOADING).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import (
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
)

from devtools.embedded_redis import free_port
from pipeline.connections import REDIS_UNAVAILABLE, BusyError, MisconfError, NoReplicasError
from pipeline.context import Context
from pipeline.jobs import Job, decode
from pipeline.keys import Keys
from pipeline.plan import resolve
from pipeline.queue import Ack, Broker, DirectQueue
from pipeline.settings import Settings
from service.app import create_app
from tests.helpers import REGISTRY, eventually
from tests.servers import Scratch, answers, raw
from tests.test_runner import _count, build_consumer

JSON = {"Content-Type": "application/json"}
#: Keys the LOADING refusal fills its server with, and how slowly each is loaded (us): the
#: restart then spends about a second loading, answering LOADING meanwhile.
FILLER_KEYS, KEY_LOAD_DELAY_US = 4000, 250


@dataclass(frozen=True)
class Refusal:
    """How to make a server refuse (``impose``) and serve again (``lift``), and the error class
    redis-py (with our parser) raises for it."""

    name: str
    error: type[Exception]
    impose: Callable[[Scratch, aioredis.Redis], Any]
    lift: Callable[[Scratch, aioredis.Redis], Any]


async def _oom(server: Scratch, admin: aioredis.Redis) -> None:
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", "1")


async def _oom_lift(server: Scratch, admin: aioredis.Redis) -> None:
    await admin.config_set("maxmemory", "0")


async def _replica(server: Scratch, admin: aioredis.Redis) -> None:
    # A replica of a primary that is not there: it keeps its data and refuses writes.
    await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))


async def _replica_lift(server: Scratch, admin: aioredis.Redis) -> None:
    await admin.execute_command("REPLICAOF", "NO", "ONE")


async def _no_replicas(server: Scratch, admin: aioredis.Redis) -> None:
    await admin.config_set("min-replicas-to-write", "1")


async def _no_replicas_lift(server: Scratch, admin: aioredis.Redis) -> None:
    await admin.config_set("min-replicas-to-write", "0")


async def _misconf(server: Scratch, admin: aioredis.Redis) -> None:
    # Snapshots configured, and one fails (its directory is gone): writes are refused.
    await admin.config_set("save", "3600 1")
    await asyncio.to_thread(shutil.rmtree, server.directory)
    await admin.bgsave()

    async def failed() -> bool:
        return (await admin.info("persistence"))["rdb_last_bgsave_status"] == "err"

    await eventually(failed, what="the background save to fail")


async def _misconf_lift(server: Scratch, admin: aioredis.Redis) -> None:
    await admin.config_set("stop-writes-on-bgsave-error", "no")
    await admin.config_set("save", "")


async def _busy(server: Scratch, admin: aioredis.Redis) -> None:
    await admin.config_set("busy-reply-threshold", "20")
    script = socket.create_connection(("127.0.0.1", server.port))
    server.sockets.append(script)
    script.sendall(b"*3\r\n$4\r\nEVAL\r\n$17\r\nwhile true do end\r\n$1\r\n0\r\n")
    await eventually(lambda: answers(server.port, b"-BUSY"), what="the server to be busy")


async def _busy_lift(server: Scratch, admin: aioredis.Redis) -> None:
    assert raw(server.port, "SCRIPT", "KILL") == b"+OK"
    await eventually(lambda: answers(server.port, b"+PONG"), what="the script to end")


async def _loading(server: Scratch, admin: aioredis.Redis) -> None:
    # A restart with a dataset that takes a while to load (each key slowed down).
    pipe = admin.pipeline(transaction=False)
    for i in range(FILLER_KEYS):
        pipe.set(f"filler:{i}", "x")
    await pipe.execute()
    await admin.save()
    server.stop()
    await server.start(
        "--key-load-delay",
        str(KEY_LOAD_DELAY_US),
        "--loading-process-events-interval-bytes",
        "1024",
        ready=b"-LOADING",
    )


async def _loading_lift(server: Scratch, admin: aioredis.Redis) -> None:
    await eventually(lambda: answers(server.port, b"+PONG"), what="the data to be loaded")
    await admin.connection_pool.disconnect()  # its connections were to the server before


REFUSALS = [
    Refusal("OOM", OutOfMemoryError, _oom, _oom_lift),
    Refusal("READONLY", ReadOnlyError, _replica, _replica_lift),
    Refusal("NOREPLICAS", NoReplicasError, _no_replicas, _no_replicas_lift),
    Refusal("MISCONF", MisconfError, _misconf, _misconf_lift),
    Refusal("BUSY", BusyError, _busy, _busy_lift),
    Refusal("LOADING", BusyLoadingError, _loading, _loading_lift),
]


@pytest.fixture
async def scratch(tmp_path: Path) -> AsyncIterator[Scratch]:
    server = Scratch(tmp_path / "redis")
    await server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def admin(scratch: Scratch) -> AsyncIterator[aioredis.Redis]:
    """A plain client for imposing and lifting (not the code under test)."""
    client = aioredis.Redis.from_url(scratch.url, socket_timeout=10)
    yield client
    await client.aclose()


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda r: r.name)
async def test_every_refusal_is_a_503_and_nothing_is_written(
    refusal: Refusal,
    scratch: Scratch,
    admin: aioredis.Redis,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await refusal.impose(scratch, admin)
    try:
        async with create_app(resolve(make_settings({"REDIS_URL": scratch.url}))).test_app() as app:
            response = await app.test_client().post(
                "/signup",
                data=orjson.dumps({"username": "alice", "email": "a@example.com"}),
                headers=JSON,
            )
            body = await response.get_json()
    finally:
        await refusal.lift(scratch, admin)
    assert response.status_code == 503, body
    assert body["error"] == "unavailable"
    assert response.headers["Retry-After"] == "1"
    assert not any(r.levelname == "ERROR" for r in caplog.records)  # no "unexpected error"
    assert await admin.keys("signup:*") == []


@dataclass
class Held:
    """The test's handler: waits for ``go``, then writes; what each run saw is kept."""

    go: asyncio.Event = field(default_factory=asyncio.Event)
    attempts: list[int] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)


HELD = Held()


async def write_after_go(ctx: Context, job: Job) -> None:
    HELD.attempts.append(job.attempt)
    await HELD.go.wait()
    try:
        await ctx.redis.incr(ctx.keys.stats + ":written")
    except Exception as exc:
        HELD.errors.append(exc)
        raise


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda r: r.name)
async def test_a_refusal_inside_a_job_returns_it_untried_and_it_runs_once_redis_serves(
    refusal: Refusal,
    scratch: Scratch,
    admin: aioredis.Redis,
    make_settings: Callable[..., Settings],
) -> None:
    global HELD
    HELD = Held()
    settings = make_settings({"REDIS_URL": scratch.url, "FETCH_TIMEOUT": "0.2"})
    keys = Keys(settings.key_prefix)
    consumer, client = build_consumer(
        settings,
        {"welcome_email": write_after_go},
        consumer_queues=("email",),
        consumer_concurrency={"email": 1},
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await DirectQueue(admin, keys, REGISTRY).push(
            "welcome_email", {"user_id": "0" * 32, "email": "a@example.com"}
        )
        await eventually(lambda: HELD.attempts == [0], what="the job to start")
        await refusal.impose(scratch, admin)
        HELD.go.set()
        await eventually(lambda: len(HELD.errors) == 1, what="the handler's write to be refused")
        assert isinstance(HELD.errors[0], refusal.error), repr(HELD.errors[0])
        assert isinstance(HELD.errors[0], REDIS_UNAVAILABLE)
        await refusal.lift(scratch, admin)

        async def written() -> bool:
            return await admin.get(keys.stats + ":written") == b"1"

        await eventually(written, timeout=15, what="the returned job to run again")
        assert not task.done()
        # Put back as it was, not as a failed attempt: no retry, no dead letter.
        assert HELD.attempts == [0, 0]
        assert await admin.llen(keys.dead) == 0
        assert await admin.zcard(keys.delayed("email")) == 0
        assert _count(consumer, "signup_jobs_total", type="welcome_email", outcome="returned") == 1
        assert _count(consumer, "signup_jobs_total", type="welcome_email", outcome="retried") == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await client.aclose()


async def test_an_ack_refused_for_memory_changes_nothing_and_counts_once_when_sent_again(
    scratch: Scratch, admin: aioredis.Redis
) -> None:
    # The ack's count is its script's first memory-growing write: an OOM refusal comes before
    # the job leaves the processing list, so the runner's second try finds it and counts it.
    keys = Keys("signup")
    broker = Broker(admin, keys, queues=REGISTRY.queues, consumer_id="c1")
    await DirectQueue(admin, keys, REGISTRY).push("welcome_email", {"email": "a@example.com"})
    [raw], _ = await broker.take("email", 1)
    ack = Ack(raw, decode(raw).id, "emails_sent")
    await admin.hset(keys.stats, "emails_sent", 0)  # the hash exists before the refusal
    await _oom(scratch, admin)
    with pytest.raises(OutOfMemoryError):
        await broker.take("email", 1, [ack])
    assert await admin.lrange(keys.processing("email", "c1"), 0, -1) == [raw]
    assert await admin.hget(keys.stats, "emails_sent") == b"0"
    await _oom_lift(scratch, admin)
    assert await broker.take("email", 1, [ack]) == ([], 1)
    assert await admin.llen(keys.processing("email", "c1")) == 0
    assert await admin.hget(keys.stats, "emails_sent") == b"1"


async def test_an_ack_whose_marker_is_refused_for_memory_removes_nothing(
    scratch: Scratch, admin: aioredis.Redis
) -> None:
    # The done-marker of an ack whose job is gone (recovered from this consumer meanwhile) is
    # the step's first memory-growing write, before any ack removes its job (the held one's
    # type keeps no counter, so no count comes first): refused for memory, the step changes
    # nothing, and sent again it removes the held job and writes the other's marker.
    keys = Keys("signup")
    broker = Broker(admin, keys, queues=REGISTRY.queues, consumer_id="c1")
    queue = DirectQueue(admin, keys, REGISTRY)
    for address in ("a@example.com", "b@example.com"):
        await queue.push("welcome_email", {"email": address})
    held, gone = (await broker.take("email", 2))[0]
    await admin.lrem(keys.processing("email", "c1"), 1, gone)
    gone_id = decode(gone).id
    acks = [Ack(held, decode(held).id), Ack(gone, gone_id, "emails_sent", keys.done(gone_id))]
    await _oom(scratch, admin)
    with pytest.raises(OutOfMemoryError):
        await broker.take("email", 1, acks)
    assert await admin.lrange(keys.processing("email", "c1"), 0, -1) == [held]
    assert not await admin.exists(keys.done(gone_id))
    await _oom_lift(scratch, admin)
    assert await broker.take("email", 1, acks) == ([], 1)
    assert await admin.llen(keys.processing("email", "c1")) == 0
    assert await admin.exists(keys.done(gone_id)) == 1
    # The gone job is counted by the consumer that holds it now, not by this ack.
    assert await admin.hget(keys.stats, "emails_sent") is None
