"""POST /signup, GET /users/<id>, GET /stats through the app, against the real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as QuartClient
from werkzeug.datastructures import Headers

from devtools.embedded_redis import free_port
from pipeline.jobs import decode
from pipeline.keys import Keys
from pipeline.plan import resolve
from pipeline.settings import Settings
from service.app import create_app
from service.validation import FORM_TYPE
from tests.helpers import REGISTRY, client_commands, eventually, scrape

JSON = {"Content-Type": "application/json"}


async def post_json(client: QuartClient, body: Any) -> tuple[int, Headers, Any]:
    response = await client.post("/signup", data=orjson.dumps(body), headers=JSON)
    return response.status_code, response.headers, await response.get_json()


async def all_keys(redis: aioredis.Redis) -> set[bytes]:
    return set(await redis.keys("*"))


async def test_signup_creates_user_and_queues_three_jobs(
    client: QuartClient, redis: aioredis.Redis, keys: Keys
) -> None:
    status, headers, body = await post_json(
        client, {"username": "alice", "email": "alice@example.com"}
    )
    assert status == 201
    assert headers["Content-Type"] == "application/json"
    assert body == {"user_id": body["user_id"], "username": "alice", "email": "alice@example.com"}
    record = await redis.hgetall(keys.user(body["user_id"]))
    assert record[b"username"] == b"alice"
    assert record[b"email"] == b"alice@example.com"
    jobs = {}
    for queue in ("email", "marketing", "profile"):
        raw = await redis.lrange(keys.queue(queue), 0, -1)
        assert len(raw) == 1, queue
        jobs[queue] = decode(raw[0])
    assert jobs["email"].type == "welcome_email"
    assert jobs["email"].payload == {
        "user_id": body["user_id"],
        "username": "alice",
        "email": "alice@example.com",
    }
    assert jobs["marketing"].type == "marketing_signup"
    assert jobs["profile"].type == "generate_profile"
    assert all(job.attempt == 0 and len(job.id) == 32 for job in jobs.values())
    assert len({job.id for job in jobs.values()}) == 3


async def test_form_encoded_signup(client: QuartClient) -> None:
    response = await client.post("/signup", form={"username": "bob_2", "email": "bob@example.com"})
    assert response.status_code == 201
    assert (await response.get_json())["username"] == "bob_2"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "malformed_body"),
        (b"[]", "application/json", 400, "malformed_body"),
        (b"\xff\xfe{}", "application/json", 400, "malformed_body"),
        (b"[" * 3000 + b"]" * 3000, "application/json", 400, "malformed_body"),
        # Deeper than json's recursion limit, within orjson's: re-parsed for repeated names.
        (b'{"a":' * 1010 + b"1" + b"}" * 1010, "application/json", 400, "malformed_body"),
        (b"username=%ff", "application/x-www-form-urlencoded", 400, "malformed_body"),
        (b"hi", "text/plain", 415, "unsupported_media_type"),
        (b"{}", "application/json; charset=utf-16", 415, "unsupported_media_type"),
        (b'{"username": "x"}', "application/json", 422, "validation"),
    ],
)
async def test_bad_bodies_get_a_json_4xx_and_write_nothing(
    client: QuartClient,
    redis: aioredis.Redis,
    body: bytes,
    content_type: str,
    status: int,
    code: str,
) -> None:
    response = await client.post("/signup", data=body, headers={"Content-Type": content_type})
    assert response.status_code == status
    payload = await response.get_json()
    assert payload["error"] == code
    assert payload["message"]
    assert await all_keys(redis) == set()


@pytest.mark.parametrize(
    "body",
    [
        b'{"username":"dupa","username":"dupb","email":"dup@example.com"}',
        # The same name spelled with an escape is the same name.
        b'{"username":"dupa","user\\u006eame":"dupb","email":"dup@example.com"}',
        b'{"username":"dupa","email":"dup@example.com","username":"dupb","username":"dupc"}',
        b"username=dupa&username=dupb&email=dup%40example.com",
    ],
    ids=["json", "json-escaped", "json-three-times", "form"],
)
async def test_a_field_given_twice_is_a_422_in_json_as_in_a_form(
    client: QuartClient, redis: aioredis.Redis, body: bytes
) -> None:
    # Parsers disagree on a repeated name (a proxy may read the first, orjson keeps the last):
    # refused, whatever the encoding.
    content_type = "application/json" if body.startswith(b"{") else FORM_TYPE
    response = await client.post("/signup", data=body, headers={"Content-Type": content_type})
    assert response.status_code == 422
    assert (await response.get_json())["fields"] == {"username": "given more than once"}
    assert await all_keys(redis) == set()


async def test_validation_error_names_each_field(client: QuartClient) -> None:
    status, _, body = await post_json(client, {"username": "a!", "email": "nope", "age": 3})
    assert status == 422
    assert body["error"] == "validation"
    assert set(body["fields"]) == {"username", "email", "age"}


async def test_missing_content_type_is_415(client: QuartClient) -> None:
    response = await client.post("/signup", data=b'{"username": "abc"}')
    assert response.status_code == 415
    assert (await response.get_json())["error"] == "unsupported_media_type"


async def test_body_over_the_limit_is_413(make_settings: Any, redis: aioredis.Redis) -> None:
    app = create_app(resolve(make_settings({"MAX_BODY_BYTES": "1024"})))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        big = orjson.dumps({"username": "alice", "email": "a@example.com", "pad": "x" * 2000})
        response = await client.post("/signup", data=big, headers=JSON)
        assert response.status_code == 413
        assert (await response.get_json())["error"] == "request_entity_too_large"
        small = orjson.dumps({"username": "alice", "email": "a@example.com"})
        assert (await client.post("/signup", data=small, headers=JSON)).status_code == 201


async def test_default_limit_is_16_kib(client: QuartClient, redis: aioredis.Redis) -> None:
    body = b'{"username": "alice", "email": "a@example.com", "pad": "' + b"x" * 16 * 1024 + b'"}'
    response = await client.post("/signup", data=body, headers=JSON)
    assert response.status_code == 413
    assert await all_keys(redis) == set()


async def test_get_signup_is_405(client: QuartClient) -> None:
    response = await client.get("/signup")
    assert response.status_code == 405
    assert (await response.get_json())["error"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".example.com"])
async def test_a_host_header_that_is_no_host_name_is_a_json_400(
    client: QuartClient, host: str
) -> None:
    """A Host header werkzeug cannot bind the routes to (not a valid international domain
    name) is refused as bad input, not a 500."""
    response = await client.post(
        "/signup", json={"username": "alice", "email": "a@example.com"}, headers={"Host": host}
    )
    assert response.status_code == 400
    assert await response.get_json() == {
        "error": "bad_request",
        "message": "the Host header is not a valid host name",
    }


async def test_unknown_route_is_json_404(client: QuartClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert (await response.get_json())["error"] == "not_found"


@pytest.mark.parametrize(
    ("second", "field"),
    [
        ({"username": "ALICE", "email": "other@example.com"}, "username"),
        ({"username": "ａｌｉｃｅ", "email": "other@example.com"}, "username"),
        ({"username": "someone", "email": "ALICE@EXAMPLE.COM"}, "email"),
        ({"username": "someone", "email": "ａｌｉｃｅ@example.com"}, "email"),
    ],
)
async def test_conflict_is_409_and_leaves_nothing(
    client: QuartClient, redis: aioredis.Redis, keys: Keys, second: dict[str, str], field: str
) -> None:
    assert (await post_json(client, {"username": "alice", "email": "alice@example.com"}))[0] == 201
    before = await all_keys(redis)
    depths = [await redis.llen(keys.queue(q)) for q in ("email", "marketing", "profile")]
    claims = (await redis.hlen(keys.username_claims), await redis.hlen(keys.email_claims))
    status, _, body = await post_json(client, second)
    assert status == 409
    assert body["error"] == "conflict"
    assert body["field"] == field
    # The conflict counted against the client's rate limit (its key may come and go: the
    # suite's limit refills in a millisecond); nothing of the signup was written.
    rate = keys.rate("").encode()
    assert {k for k in await all_keys(redis) if not k.startswith(rate)} == {
        k for k in before if not k.startswith(rate)
    }
    assert [await redis.llen(keys.queue(q)) for q in ("email", "marketing", "profile")] == depths
    assert (await redis.hlen(keys.username_claims), await redis.hlen(keys.email_claims)) == claims
    assert int(await redis.hget(keys.stats, "users")) == 1


async def test_forty_concurrent_signups_for_one_username_give_one_201(
    client: QuartClient, redis: aioredis.Redis, keys: Keys
) -> None:
    results = await asyncio.gather(
        *(post_json(client, {"username": "Racer", "email": f"r{i}@example.com"}) for i in range(40))
    )
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [201] + [409] * 39
    assert await redis.hlen(keys.username_claims) == 1
    assert await redis.hlen(keys.email_claims) == 1
    assert await redis.llen(keys.queue("email")) == 1
    assert len(await redis.keys(keys.user("*"))) == 1


async def test_one_redis_round_trip_per_signup(
    client: QuartClient, redis: aioredis.Redis, redis_server: Any
) -> None:
    # Warm up: the first call loads the script (EVALSHA -> NOSCRIPT -> SCRIPT LOAD).
    assert (await post_json(client, {"username": "warm", "email": "warm@example.com"}))[0] == 201

    async def sign_up_twenty() -> None:
        for i in range(20):
            body = {"username": f"user{i}", "email": f"u{i}@example.com"}
            assert (await post_json(client, body))[0] == 201

    assert await client_commands(redis_server, redis, sign_up_twenty) == ["EVALSHA"] * 20


async def test_503_when_redis_is_down_is_fast_and_writes_nothing(
    make_settings: Any, redis: aioredis.Redis
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(resolve(make_settings({"REDIS_URL": closed})))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        status, headers, body = await asyncio.wait_for(
            post_json(client, {"username": "alice", "email": "a@example.com"}), timeout=2
        )
    assert status == 503
    assert body["error"] == "unavailable"
    assert int(headers["Retry-After"]) >= 1


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers: a hung Redis."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    done.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


async def test_503_when_redis_hangs_comes_within_2_seconds(
    make_settings: Any, silent_server: int
) -> None:
    app = create_app(resolve(make_settings({"REDIS_URL": f"redis://127.0.0.1:{silent_server}/0"})))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        status, headers, _ = await asyncio.wait_for(
            post_json(client, {"username": "alice", "email": "a@example.com"}), timeout=2
        )
    assert status == 503
    assert "Retry-After" in headers


async def test_503_mid_commit_leaves_nothing(client: QuartClient, redis: aioredis.Redis) -> None:
    # Writes are paused: the commit times out client-side and redis-py drops the connection.
    # Once Redis has seen it go, the paused script is discarded: it never runs, even after
    # the pause ends. (Had Redis run it just before the timeout, the signup would exist: the
    # README's "Known limits".)
    await redis.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
    try:
        status, _, body = await post_json(client, {"username": "alice", "email": "a@example.com"})

        async def commit_dropped() -> bool:
            clients = await redis.client_list()
            return not any(c.get("cmd", "").startswith("evalsha") for c in clients)

        await eventually(commit_dropped, timeout=4, what="Redis to drop the timed-out commit")
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
    assert status == 503
    assert body["error"] == "unavailable"
    await redis.ping()
    assert await all_keys(redis) == set()


# --- receivers -------------------------------------------------------------------------


@pytest.fixture
async def with_bad_receivers(make_settings: Any) -> AsyncIterator[QuartClient]:
    """A client of an app whose reactions include ``tests.reactions.faulty``."""
    settings = make_settings({"REACTIONS": "reactions,tests.reactions.faulty"})
    async with create_app(resolve(settings)).test_app() as test_app:
        yield test_app.test_client()


async def test_failing_receiver_is_isolated_logged_and_counted(
    with_bad_receivers: QuartClient,
    redis: aioredis.Redis,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = with_bad_receivers
    with caplog.at_level(logging.ERROR, logger="pipeline.signals"):
        status, _, _ = await post_json(client, {"username": "alice", "email": "a@example.com"})
    assert status == 201
    for queue in ("email", "marketing", "profile"):
        assert await redis.llen(keys.queue(queue)) == 1
    assert int(await redis.hget(keys.stats, "receiver_errors")) == 2
    metrics = await scrape(client)
    assert metrics[("signup_receiver_errors_total", (("receiver", "broken_receiver"),))] == 1
    assert metrics[("signup_receiver_errors_total", (("receiver", "sync_receiver"),))] == 1
    raised = [r for r in caplog.records if "broken_receiver" in r.getMessage()]
    assert raised and raised[0].exc_info is not None
    assert "receiver exploded" in caplog.text


# --- reading -------------------------------------------------------------------------


async def test_get_user_with_pending_profile(client: QuartClient) -> None:
    _, _, created = await post_json(client, {"username": "alice", "email": "a@example.com"})
    response = await client.get(f"/users/{created['user_id']}")
    assert response.status_code == 200
    user = await response.get_json()
    assert user["user_id"] == created["user_id"]
    assert user["username"] == "alice"
    assert user["email"] == "a@example.com"
    assert user["profile"] is None


@pytest.mark.parametrize("user_id", ["0" * 32, "not-an-id", "..%2f..%2fetc"])
async def test_unknown_user_is_404(client: QuartClient, user_id: str) -> None:
    response = await client.get(f"/users/{user_id}")
    assert response.status_code == 404
    assert (await response.get_json())["error"] == "not_found"


async def test_stats_shape(client: QuartClient) -> None:
    await post_json(client, {"username": "alice", "email": "a@example.com"})
    stats = await (await client.get("/stats")).get_json()
    assert stats["emails_sent"] == 0
    assert stats["marketing_list_updates"] == 0
    assert stats["profiles_generated"] == 0
    # One job on each built-in queue; a reaction added beside them pushes for this signup or
    # not, as it decides.
    assert {q: stats["queues"][q] for q in ("email", "marketing", "profile")} == {
        "email": 1,
        "marketing": 1,
        "profile": 1,
    }
    assert set(stats["queues"]) == set(REGISTRY.queues)
    assert stats["dead_letter"] == 0
    assert stats["users"] == 1


async def test_stats_is_503_when_redis_is_down(make_settings: Any) -> None:
    settings: Settings = make_settings({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    async with create_app(resolve(dataclasses.replace(settings))).test_app() as test_app:
        response = await test_app.test_client().get("/stats")
    assert response.status_code == 503


async def test_a_cancelled_commit_is_written_whole(
    app: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    # Quart cancels a handler whose client went away. Once the commit is queued, the batch
    # goes out whatever becomes of the request: the signup is written whole, never in part.
    from service.deps import EXTENSION
    from service.users import NewUser, SignupJobs

    store = app.app.extensions[EXTENSION].users
    jobs = SignupJobs(app.app.extensions[EXTENSION].registry)
    for job_type in ("welcome_email", "marketing_signup", "generate_profile"):
        await jobs.push(job_type, {"user_id": "u"})
    user = NewUser("a" * 32, "alice", "a@example.com", 1.0, "alice", "a@example.com")
    task = asyncio.create_task(store.create(user, jobs, receiver_errors=0, client="192.0.2.1"))
    await asyncio.sleep(0)  # let it start
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def written() -> bool:
        return bool(await redis.exists(keys.user(user.user_id)))

    from tests.helpers import eventually

    await eventually(written, what="the cancelled request's commit")
    assert await redis.hget(keys.username_claims, "alice") == user.user_id.encode()
    for queue in ("email", "marketing", "profile"):
        assert await redis.llen(keys.queue(queue)) == 1


async def test_stopping_the_app_closes_its_redis_connections(
    make_settings: Any, redis: aioredis.Redis
) -> None:
    before = len(await redis.client_list())
    async with create_app(resolve(make_settings())).test_app() as test_app:
        client = test_app.test_client()
        await asyncio.gather(
            *(
                post_json(client, {"username": f"u{i}x", "email": f"u{i}@example.com"})
                for i in range(10)
            )
        )
        assert len(await redis.client_list()) > before

    async def closed() -> bool:
        # Redis notices a closed socket on its next event: poll, with a deadline.
        return len(await redis.client_list()) == before

    from tests.helpers import eventually

    await eventually(closed, timeout=5, what="the app's connections to close")


@pytest.mark.parametrize(
    ("env", "username", "status"),
    [
        ({}, "Admin", 422),
        ({}, "r.o.o.t", 422),
        ({"RESERVED_USERNAMES": "ceo"}, "CEO", 422),
        ({"RESERVED_USERNAMES": "ceo"}, "admin", 201),
        ({"RESERVED_USERNAMES": "none"}, "root", 201),
    ],
)
async def test_reserved_usernames_are_refused_with_422(
    make_settings: Any, redis: aioredis.Redis, env: dict[str, str], username: str, status: int
) -> None:
    async with create_app(resolve(make_settings(env))).test_app() as test_app:
        got, _, body = await post_json(
            test_app.test_client(), {"username": username, "email": "x@example.com"}
        )
    assert got == status
    if status == 422:
        assert body["fields"] == {"username": "is reserved"}
        assert await all_keys(redis) == set()
