"""What an operator wires up: health checks, the consumers' ``check`` command, metrics, logs."""

from __future__ import annotations

import signal
from collections.abc import Callable

import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as QuartClient

from pipeline.embedded_redis import free_port
from pipeline.keys import Keys
from pipeline.settings import Settings
from service.app import create_app
from tests.conftest import RedisServer, eventually
from tests.processes import Child, admin, child_env, consumer_argv

Spawn = Callable[[list[str], dict[str, str]], Child]


# --- health -------------------------------------------------------------------------------


async def test_healthz_answers_without_redis(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
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
    app = create_app(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
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
