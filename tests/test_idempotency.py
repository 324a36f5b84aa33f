"""``Idempotency-Key`` on POST /signup: a retry gets the original 201, another body a 422, a
malformed key a 400; the key's record is written by the signup's commit script."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as QuartClient

from pipeline.keys import Keys
from pipeline.plan import resolve
from service.app import create_app

ALICE = {"username": "alice", "email": "alice@example.com"}


async def stored(redis: aioredis.Redis) -> dict[bytes, bytes]:
    """Every key and its type, but the rate limit's (which the suite's limit lets expire
    within a millisecond)."""
    return {key: await redis.type(key) for key in await redis.keys("*") if b":rate:" not in key}


async def post(client: QuartClient, body: Any, key: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    response = await client.post("/signup", data=orjson.dumps(body), headers=headers)
    return response.status_code, await response.get_json()


async def test_a_retry_with_the_same_key_gets_the_original_201_and_writes_nothing_more(
    client: QuartClient, redis: aioredis.Redis, keys: Keys
) -> None:
    status, first = await post(client, ALICE, "a1b2c3")
    assert status == 201
    written = await stored(redis)
    depths = [await redis.llen(keys.queue(q)) for q in ("email", "marketing", "profile")]
    for _ in range(2):
        status, again = await post(client, ALICE, "a1b2c3")
        assert status == 201
        assert again == first  # the same user_id
    assert await stored(redis) == written
    assert [await redis.llen(keys.queue(q)) for q in ("email", "marketing", "profile")] == depths
    assert await redis.hget(keys.stats, "users") == b"1"
    # Without the key, the same body is what it always was: taken.
    assert (await post(client, ALICE, None))[0] == 409


async def test_the_same_key_with_another_body_is_a_422_and_nothing_is_written(
    client: QuartClient, redis: aioredis.Redis, keys: Keys
) -> None:
    assert (await post(client, ALICE, "k-1"))[0] == 201
    before = await stored(redis)
    status, body = await post(client, {"username": "bob", "email": "bob@example.com"}, "k-1")
    assert status == 422
    assert body["error"] == "idempotency_key_reused"
    assert body["fields"] == {"Idempotency-Key": "already used for a different signup"}
    assert await stored(redis) == before
    assert await redis.hget(keys.stats, "users") == b"1"


async def test_the_record_is_kept_for_the_ttl_under_a_hash_of_the_key(
    make_settings: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    async with create_app(resolve(make_settings({"IDEMPOTENCY_KEY_TTL": "600"}))).test_app() as app:
        assert (await post(app.test_client(), ALICE, "secret-ish key"))[0] == 201
    record = keys.idempotency("secret-ish key")
    assert record.endswith(hashlib.sha256(b"secret-ish key").hexdigest())
    assert 590_000 < await redis.pttl(record) <= 600_000
    assert not any(b"secret-ish" in key for key in await redis.keys("*"))


@pytest.mark.parametrize(
    ("first", "second"),
    [('"quoted-key"', "quoted-key"), ('"a\\"b\\\\c"', 'a"b\\c')],
    ids=["plain", "escapes"],
)
async def test_a_structured_field_string_is_the_key_it_quotes(
    client: QuartClient, first: str, second: str
) -> None:
    status, original = await post(client, ALICE, first)
    assert status == 201
    assert await post(client, ALICE, second) == (201, original)


@pytest.mark.parametrize(
    "key",
    ["", '""', "x" * 256, "caf\u00e9", "tab\there", '"unterminated\\"', '"a"b"', '"\\x"'],
    ids=["empty", "empty-string", "too-long", "non-ascii", "control", "lone-escape",
         "bare-quote", "bad-escape"],
)  # fmt: skip
async def test_a_malformed_key_is_a_400_and_nothing_is_written(
    client: QuartClient, redis: aioredis.Redis, key: str
) -> None:
    response = await client.post(
        "/signup",
        data=orjson.dumps(ALICE),
        headers=[("Content-Type", "application/json"), ("Idempotency-Key", key)],
    )
    assert response.status_code == 400
    body = await response.get_json()
    assert body["error"] == "invalid_idempotency_key"
    assert body["message"].startswith("the Idempotency-Key header ")
    assert await redis.keys("*") == []


async def test_a_key_of_255_characters_is_taken(client: QuartClient) -> None:
    assert (await post(client, ALICE, "k" * 255))[0] == 201
