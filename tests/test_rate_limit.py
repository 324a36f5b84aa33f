"""Signups limited per client address: the GCRA in the signup's script, the client address
behind trusted proxies, and what the limit does when its state cannot be read."""

from __future__ import annotations

import ipaddress
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as QuartClient

from pipeline.keys import Keys
from pipeline.plan import resolve
from pipeline.settings import RateLimit
from service.app import create_app
from service.clients import UNKNOWN, ClientResolver
from service.rate_limit import RefusedClients
from tests.helpers import eventually, scrape

JSON = {"Content-Type": "application/json"}


async def sign_up(
    client: QuartClient, n: int, peer: str = "203.0.113.9", headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    body = {"username": f"user{n}", "email": f"user{n}@example.com"}
    response = await client.post(
        "/signup",
        data=orjson.dumps(body),
        headers={**JSON, **(headers or {})},
        scope_base={"client": (peer, 40000 + n)},
    )
    return response.status_code, response.headers, await response.get_json()


async def test_a_client_over_its_limit_gets_429_with_retry_after_and_nothing_written(
    make_settings: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    app = create_app(resolve(make_settings({"RATE_LIMIT": "3/60"})))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        statuses = [(await sign_up(client, n))[0] for n in range(3)]
        assert statuses == [201, 201, 201]
        status, headers, body = await sign_up(client, 3)
        assert status == 429
        # One signup is due every 20 s; the first of them is nearly 20 s away.
        assert 15 <= int(headers["Retry-After"]) <= 20
        assert body == {
            "error": "rate_limited",
            "message": f"too many signups from your address; retry in {body['retry_after']} s",
            "retry_after": int(headers["Retry-After"]),
        }
        # Another address is not held back by this one.
        assert (await sign_up(client, 4, peer="198.51.100.7"))[0] == 201
        samples = await scrape(client)
    assert await redis.hget(keys.stats, "users") == b"4"
    assert await redis.hget(keys.username_claims, "user3") is None
    assert await redis.llen(keys.queue("email")) == 4
    assert samples[("signup_signups_total", (("outcome", "rate_limited"),))] == 1


async def test_a_conflict_counts_against_the_limit(
    make_settings: Any, redis: aioredis.Redis
) -> None:
    # Probing for taken addresses is what the limit must slow down.
    app = create_app(resolve(make_settings({"RATE_LIMIT": "2/60"})))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert (await sign_up(client, 1))[0] == 201
        assert (await sign_up(client, 1))[0] == 409
        assert (await sign_up(client, 2))[0] == 429


async def test_the_limit_refills_one_signup_per_period_over_count(
    make_settings: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    settings = make_settings({"RATE_LIMIT": "2/60"})
    async with create_app(resolve(settings)).test_app() as test_app:
        client = test_app.test_client()
        assert [(await sign_up(client, n))[0] for n in range(3)] == [201, 201, 429]
    # Wind the client's state back 30 s (one interval), as if that time had passed, and ask
    # through another app (another worker), which has not refused this client itself.
    key = keys.rate("203.0.113.9")
    await redis.set(key, int(await redis.get(key)) - 30_000, keepttl=True)
    async with create_app(resolve(settings)).test_app() as test_app:
        client = test_app.test_client()
        assert [(await sign_up(client, n))[0] for n in range(3, 5)] == [201, 429]


async def test_the_state_of_a_client_expires_once_it_is_full_again(
    make_settings: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    app = create_app(resolve(make_settings({"RATE_LIMIT": "4/60"})))
    async with app.test_app() as test_app:
        assert (await sign_up(test_app.test_client(), 1))[0] == 201
    ttl = await redis.pttl(keys.rate("203.0.113.9"))
    assert 14_000 < ttl <= 15_000  # one interval: then the bucket is full and the key gone


async def test_no_limit_when_off(make_settings: Any, redis: aioredis.Redis, keys: Keys) -> None:
    app = create_app(resolve(make_settings({"RATE_LIMIT": "off"})))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert {(await sign_up(client, n))[0] for n in range(12)} == {201}
    assert await redis.keys(keys.rate("*")) == []


@pytest.mark.parametrize(("failure", "status"), [("closed", 503), ("open", 201)])
async def test_a_limit_whose_state_cannot_be_read_fails_as_configured(
    make_settings: Any, redis: aioredis.Redis, keys: Keys, failure: str, status: int
) -> None:
    await redis.hset(keys.rate("203.0.113.9"), "not", "a number")  # WRONGTYPE for GET
    settings = make_settings({"RATE_LIMIT": "1/60", "RATE_LIMIT_FAILURE": failure})
    async with create_app(resolve(settings)).test_app() as test_app:
        client = test_app.test_client()
        got = [(await sign_up(client, n))[0] for n in range(2)]
    assert got == [status, status]
    assert await redis.hget(keys.stats, "users") == (b"2" if failure == "open" else None)


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # Untrusted peers: X-Forwarded-For is ignored, whatever it says.
        ("203.0.113.9", ["1.2.3.4"], "203.0.113.9"),
        # A trusted proxy: the first address from the right that is not a trusted proxy.
        ("10.0.0.2", ["1.2.3.4"], "1.2.3.4"),
        ("10.0.0.2", ["6.6.6.6, 1.2.3.4, 10.0.0.3"], "1.2.3.4"),
        ("10.0.0.2", ["6.6.6.6", "1.2.3.4"], "1.2.3.4"),
        # Only trusted hops, or no header: the last trusted one.
        ("10.0.0.2", ["10.0.0.5"], "10.0.0.5"),
        ("10.0.0.2", [], "10.0.0.2"),
        # A hop that is not an address ends the walk at the last one that was.
        ("10.0.0.2", ["1.2.3.4, evil\r\nkey"], "10.0.0.2"),
        ("10.0.0.2", ["1.2.3.4, 10.0.0.9, garbage"], "10.0.0.2"),
        ("10.0.0.2", ["1.2.3.4:5555"], "1.2.3.4"),
        ("10.0.0.2", ["[2001:db8::1]:443"], "2001:db8::/64"),
        # IPv6 clients are their /64; IPv4-mapped addresses are IPv4.
        ("2001:db8:1:2:3:4:5:6", [], "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", [], "192.0.2.1"),
        ("fe80::1%eth0", [], "fe80::/64"),
        (None, ["1.2.3.4"], UNKNOWN),
        ("not-an-address", [], UNKNOWN),
    ],
)
def test_the_client_address(peer: str | None, forwarded: list[str], client: str) -> None:
    resolve = ClientResolver([ipaddress.ip_network("10.0.0.0/8")])
    assert resolve(peer, lambda: forwarded) == client


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(
    make_settings: Any, redis: aioredis.Redis
) -> None:
    settings = make_settings({"RATE_LIMIT": "1/60", "TRUSTED_PROXIES": "10.0.0.0/8"})
    async with create_app(resolve(settings)).test_app() as test_app:
        client = test_app.test_client()
        # Behind the proxy, two clients each get their own limit.
        for n, who in enumerate(["1.1.1.1", "2.2.2.2"]):
            assert (await sign_up(client, n, "10.1.1.1", {"X-Forwarded-For": who}))[0] == 201
        assert (await sign_up(client, 2, "10.1.1.1", {"X-Forwarded-For": "1.1.1.1"}))[0] == 429
        # A client that is not a proxy cannot pick a fresh address for itself.
        assert (await sign_up(client, 3, "203.0.113.9", {"X-Forwarded-For": "3.3.3.3"}))[0] == 201
        assert (await sign_up(client, 4, "203.0.113.9", {"X-Forwarded-For": "4.4.4.4"}))[0] == 429


async def test_a_limit_finer_than_a_double_can_hold_still_works(
    make_settings: Any, redis: aioredis.Redis
) -> None:
    # One signup due every 1e-6 ms: added to a Unix time in ms (~1.8e12) it vanishes, and the
    # key's expiry came out as PX 0, which Redis refuses ("invalid expire time"): a 500.
    app = create_app(resolve(make_settings(rate_limit=RateLimit(10**9, 1.0))))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert [(await sign_up(client, n))[0] for n in range(3)] == [201, 201, 201]


async def evalsha_calls(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_refused_client_is_refused_again_without_a_redis_round_trip(
    make_settings: Any, redis: aioredis.Redis
) -> None:
    app = create_app(resolve(make_settings({"RATE_LIMIT": "1/60"})))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert (await sign_up(client, 1))[0] == 201
        assert (await sign_up(client, 2))[0] == 429  # Redis's verdict
        before = await evalsha_calls(redis)
        status, headers, body = await sign_up(client, 3)
        assert status == 429
        assert body["error"] == "rate_limited"
        assert 55 <= int(headers["Retry-After"]) <= 60
        # Not even the body is looked at: a malformed one gets the same answer.
        response = await client.post(
            "/signup", data=b"{", headers=JSON, scope_base={"client": ("203.0.113.9", 1)}
        )
        assert response.status_code == 429
        assert await evalsha_calls(redis) == before
        # Another client still gets through to Redis.
        assert (await sign_up(client, 4, peer="198.51.100.7"))[0] == 201
        assert await evalsha_calls(redis) == before + 1


async def test_refused_clients_are_forgotten_when_their_wait_is_over() -> None:
    refused = RefusedClients(max_size=3)
    refused.refuse("a", 0.05)
    assert refused.wait("a") == 1
    await eventually(lambda: refused.wait("a") is None, timeout=2, what="the wait to pass")
    for name in "bcde":
        refused.refuse(name, 60)
    assert len(refused) == 3  # bounded: the oldest went
    assert refused.wait("b") is None
    assert refused.wait("e") == 60
