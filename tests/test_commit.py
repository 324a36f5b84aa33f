"""The signup commit for many signups in one script call: the signups that reach their commit
together go to Redis in one call, and each is answered as if it had a call of its own: the
claims, the rate limit and the idempotency records of the signups before it in the call count,
its jobs are queued in the order of the signups, and a call Redis refuses writes nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from pipeline.jobs import Job, new_id
from pipeline.keys import Keys
from pipeline.plan import resolve
from pipeline.settings import RateLimit, Settings
from service.errors import (
    ConflictError,
    IdempotencyKeyReusedError,
    RateLimitedError,
)
from service.users import NewUser, SignupJobs, UserStore

QUEUES = ("email", "marketing", "profile")


def new_user(username: str, email: str | None = None) -> NewUser:
    email = email or f"{username}@example.com"
    return NewUser(
        user_id=new_id(),
        username=username,
        email=email,
        created_at=time.time(),
        username_claim=username.lower(),
        email_claim=email.lower(),
    )


class Store:
    """A UserStore and what each of its commits sent: the calls its script got."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, settings: Settings, **kwargs: Any):
        self.store = UserStore(redis, keys, **kwargs)
        self.registry = resolve(settings).registry
        self.calls: list[int] = []  # signups per script call
        build = self.store._call

        def counting(signups: list[Any]) -> tuple[list[Any], list[Any]]:
            self.calls.append(len(signups))
            return build(signups)

        self.store._create._build = counting  # type: ignore[assignment]

    async def sign_up(
        self, user: NewUser, client: str = "203.0.113.9", key: str | None = None
    ) -> bytes | Exception:
        """One signup with a job on each queue: its 201's body, or the error it raised."""
        jobs = SignupJobs(self.registry)
        for queue in QUEUES:
            jobs.queued.append((queue, Job(new_id(), queue, {"username": user.username}, 0.0)))
        try:
            return await self.store.create(user, jobs, 0, client, key)
        except Exception as exc:
            return exc

    async def together(self, *signups: tuple[Any, ...]) -> list[bytes | Exception]:
        """``signups`` (sign_up's arguments each) made in one loop tick: one script call."""
        before = len(self.calls)
        results = await asyncio.gather(*(self.sign_up(*args) for args in signups))
        assert self.calls[before:] == [len(signups)]
        return results


@pytest.fixture
def store(redis: aioredis.Redis, keys: Keys, settings: Settings) -> Store:
    return Store(redis, keys, settings)


async def test_signups_in_one_call_claim_in_order_and_a_refused_one_leaves_no_claim(
    store: Store, redis: aioredis.Redis, keys: Keys
) -> None:
    ann, ann_again, bob_taken_email, bob = (
        new_user("ann"),
        new_user("Ann", "other@example.com"),  # the same claim as ann's username
        new_user("bob", "ann@example.com"),  # ann's email
        new_user("bob", "bob@example.com"),  # its username is still free: bob's was refused
    )
    results = await store.together((ann,), (ann_again,), (bob_taken_email,), (bob,))
    assert isinstance(results[0], bytes) and orjson.loads(results[0])["user_id"] == ann.user_id
    assert isinstance(results[1], ConflictError) and results[1].details == {"field": "username"}
    assert isinstance(results[2], ConflictError) and results[2].details == {"field": "email"}
    assert isinstance(results[3], bytes) and orjson.loads(results[3])["user_id"] == bob.user_id
    assert await redis.hgetall(keys.username_claims) == {
        b"ann": ann.user_id.encode(),
        b"bob": bob.user_id.encode(),
    }
    assert await redis.hgetall(keys.email_claims) == {
        b"ann@example.com": ann.user_id.encode(),
        b"bob@example.com": bob.user_id.encode(),
    }
    assert await redis.hget(keys.stats, "users") == b"2"
    for user in (ann, bob):
        assert (await redis.hgetall(keys.user(user.user_id)))[b"username"] == user.username.encode()
    for user in (ann_again, bob_taken_email):
        assert not await redis.exists(keys.user(user.user_id))
    # A claim taken in an earlier call is taken for a later one too.
    assert isinstance(await store.sign_up(new_user("ann", "x@example.com")), ConflictError)


async def test_a_calls_jobs_are_queued_in_the_order_of_its_signups(
    store: Store, redis: aioredis.Redis, keys: Keys
) -> None:
    users = [new_user(f"user{i}") for i in range(6)]
    await store.together(*((user,) for user in users))
    for queue in QUEUES:
        # LPUSH in, popped from the right: the first signup's job is next.
        raws = await redis.lrange(keys.queue(queue), 0, -1)
        assert [orjson.loads(raw)["payload"]["username"] for raw in reversed(raws)] == [
            user.username for user in users
        ]
        assert [orjson.loads(raw)["type"] for raw in raws] == [queue] * 6


async def test_the_rate_limit_counts_a_calls_signups_in_turn_per_client(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    store = Store(redis, keys, settings, rate_limit=RateLimit(3, 60.0))
    results = await store.together(
        *((new_user(f"a{i}"), "192.0.2.1") for i in range(5)),
        (new_user("b0"), "192.0.2.2"),
        (new_user("a1"), "192.0.2.2"),  # a conflict counts too, against its own client
        (new_user("b2"), "192.0.2.2"),
        (new_user("b3"), "192.0.2.2"),
    )
    kinds = [type(result).__name__ for result in results]
    assert kinds == ["bytes"] * 3 + ["RateLimitedError"] * 2 + [
        "bytes",
        "ConflictError",
        "bytes",
        "RateLimitedError",
    ]
    # Each client's state is as three signups one after the other would leave it: the next
    # is due 60 s from the first (one every 20 s, three at once), so it waits about 20 s.
    for client in ("192.0.2.1", "192.0.2.2"):
        assert 59_000 < await redis.pttl(keys.rate(client)) <= 60_000
    refused = results[3]
    assert isinstance(refused, RateLimitedError) and refused.headers == {"Retry-After": "20"}
    assert await redis.hget(keys.stats, "users") == b"5"


async def test_an_idempotency_key_used_twice_in_one_call_replays_the_first(
    store: Store, redis: aioredis.Redis, keys: Keys
) -> None:
    ann = new_user("ann")
    ann_retried = new_user("ann")  # the same request again (a signup's user id is new each time)
    other = new_user("zed")
    first, replay, reused = await store.together(
        (ann, "203.0.113.9", "key-1"),
        (ann_retried, "203.0.113.9", "key-1"),
        (other, "203.0.113.9", "key-1"),
    )
    assert replay == first
    assert isinstance(reused, IdempotencyKeyReusedError)
    assert await redis.hget(keys.stats, "users") == b"1"
    assert await redis.llen(keys.queue("email")) == 1
    record = await redis.get(keys.idempotency("key-1"))
    assert record is not None and record[64:] == first


async def test_a_call_refused_for_memory_writes_nothing_and_fails_every_signup(
    store: Store, redis: aioredis.Redis, keys: Keys
) -> None:
    await store.sign_up(new_user("before"))
    written = {key: await redis.type(key) for key in await redis.keys("*")}
    depths = [await redis.llen(keys.queue(q)) for q in QUEUES]
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")
    try:
        results = await store.together(*((new_user(f"user{i}"),) for i in range(4)))
    finally:
        await redis.config_set("maxmemory", 0)
    assert all(isinstance(r, OutOfMemoryError) for r in results), results
    assert {key: await redis.type(key) for key in await redis.keys("*")} == written
    assert [await redis.llen(keys.queue(q)) for q in QUEUES] == depths
    assert await redis.hget(keys.stats, "users") == b"1"
