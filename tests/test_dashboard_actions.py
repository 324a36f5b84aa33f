"""The dashboard's actions on dead letters and retries (through its JSON API, on a real Redis):
paged listings, requeue, delete, purge, run now; every action refused without the page's
token or from another site; and the dead letters counted per queue by every script that adds
or removes them."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from dashboard.app import MAX_PAGE, TOKEN_HEADER, create_dashboard
from pipeline.dead import DeadLetter, DeadLetters
from pipeline.jobs import Job, decode, new_job
from pipeline.keys import Keys
from pipeline.plan import resolve
from pipeline.queue import Broker
from pipeline.stats import read_stats
from tests.helpers import REGISTRY, RedisServer
from tests.processes import admin
from tests.test_dashboard import GOOD, PASSWORD


@pytest.fixture
async def dashboard(make_settings: Any, redis: aioredis.Redis) -> Any:
    app = create_dashboard(resolve(make_settings({"DASHBOARD_PASSWORD": PASSWORD})))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        client.token = app.extensions["dashboard_guard"].token
        yield client


async def get(dashboard: Any, path: str) -> tuple[int, Any]:
    answer = await dashboard.get(path, headers=GOOD)
    return answer.status_code, orjson.loads(await answer.get_data())


async def post(dashboard: Any, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    sent = {**GOOD, TOKEN_HEADER: dashboard.token, "Sec-Fetch-Site": "same-origin", **headers}
    answer = await dashboard.post(path, headers=sent, json=body)
    return answer.status_code, orjson.loads(await answer.get_data())


def email_job(n: int) -> Job:
    return new_job("welcome_email", {"user_id": "u", "username": f"u{n}", "email": f"{n}@x.org"})


async def kill(broker: Broker, queue: str, job: Job, error: str = "boom") -> None:
    """Dead-letter ``job`` the way a consumer does (at-most-once: nothing held to settle)."""
    failed = dataclasses.replace(job, attempt=4)
    raw = failed.encode()
    entry = DeadLetter.for_job(queue, raw, "failed 5 attempts", job=failed, error=error)
    assert await broker.dead_letter(queue, raw, entry.encode(), job.id)


@pytest.fixture
def broker(redis: aioredis.Redis, keys: Keys) -> Broker:
    return Broker(redis, keys, queues=REGISTRY.queues, mode="at-most-once")


async def test_dead_letters_are_listed_newest_first_a_page_at_a_time(
    dashboard: Any, broker: Broker, redis: aioredis.Redis, keys: Keys
) -> None:
    jobs = [email_job(n) for n in range(30)]
    for job in jobs:
        await kill(broker, "email", job, error=f"error {job.payload['username']}")
    status, first = await get(dashboard, "/api/dead?offset=0&limit=25")
    assert status == 200 and (first["total"], first["offset"], first["limit"]) == (30, 0, 25)
    assert [e["id"] for e in first["entries"]] == [j.id for j in reversed(jobs)][:25]
    newest = first["entries"][0]
    assert newest["error"] == "error u29" and newest["attempts"] == 5
    assert newest["queue"] == "email" and newest["type"] == "welcome_email"
    assert newest["requeueable"] is True and decode(newest["job"].encode()).id == jobs[-1].id
    _, second = await get(dashboard, "/api/dead?offset=25&limit=25")
    assert [e["id"] for e in second["entries"]] == [j.id for j in reversed(jobs)][25:]
    _, default = await get(dashboard, "/api/dead")
    assert len(default["entries"]) == 25
    for bad in ("limit=0", f"limit={MAX_PAGE + 1}", "offset=-1", "offset=abc", "limit=1e3"):
        status, body = await get(dashboard, f"/api/dead?{bad}")
        assert status == 400 and body["error"].startswith("invalid_"), bad
        assert bad.split("=")[0] in body["message"]


async def test_dead_letters_are_requeued_deleted_and_purged_each_once(
    dashboard: Any, broker: Broker, redis: aioredis.Redis, keys: Keys
) -> None:
    jobs = [email_job(n) for n in range(4)]
    for job in jobs:
        await kill(broker, "email", job)
    await redis.lpush(keys.dead, DeadLetter.for_job("email", b"<not json>", "undecodable").encode())
    _, listing = await get(dashboard, "/api/dead")
    by_id = {e["id"]: e for e in listing["entries"]}
    undecodable = listing["entries"][0]
    assert undecodable["id"] is None and undecodable["requeueable"] is False

    # Requeue one: back on its queue as a first attempt; a second time it is gone.
    assert await post(dashboard, "/api/dead/requeue", {"ref": by_id[jobs[0].id]["ref"]}) == (
        200,
        {"requeued": 1, "skipped": 0},
    )
    [back] = [decode(raw) for raw in await redis.lrange(keys.queue("email"), 0, -1)]
    assert (back.id, back.attempt) == (jobs[0].id, 0)
    status, body = await post(dashboard, "/api/dead/requeue", {"ref": by_id[jobs[0].id]["ref"]})
    assert status == 409 and body["error"] == "gone"
    assert await redis.llen(keys.queue("email")) == 1  # not pushed twice
    status, body = await post(dashboard, "/api/dead/requeue", {"ref": undecodable["ref"]})
    assert (status, body["error"]) == (422, "undecodable")

    # Delete one, once.
    assert await post(dashboard, "/api/dead/delete", {"ref": by_id[jobs[1].id]["ref"]}) == (
        200,
        {"deleted": 1},
    )
    status, _ = await post(dashboard, "/api/dead/delete", {"ref": by_id[jobs[1].id]["ref"]})
    assert status == 409
    # A ref naming nothing on the list, and refs that are not refs.
    made_up = {"ref": "bm90IGFuIGVudHJ5"}
    assert (await post(dashboard, "/api/dead/delete", made_up))[0] == 409
    for body in ({}, {"ref": 7}, {"ref": "!!"}, [], "x"):
        status, answer = await post(dashboard, "/api/dead/delete", body)
        assert status == 400 and answer["error"] in ("invalid_ref", "invalid_json"), body

    # Requeue all: the two left that can be; the undecodable one stays.
    assert await post(dashboard, "/api/dead/requeue", {"all": True}) == (
        200,
        {"requeued": 2, "skipped": 1},
    )
    assert await redis.llen(keys.queue("email")) == 3
    assert await post(dashboard, "/api/dead/purge", {}) == (200, {"purged": 1})
    assert await redis.llen(keys.dead) == 0


async def test_every_action_needs_the_token_and_this_origin(
    dashboard: Any, broker: Broker, redis: aioredis.Redis, keys: Keys
) -> None:
    await kill(broker, "email", email_job(0))
    refusals = [
        ({TOKEN_HEADER: ""}, 403, "bad_token"),
        ({TOKEN_HEADER: "not-the-token"}, 403, "bad_token"),
        ({"Sec-Fetch-Site": "cross-site"}, 403, "cross_site"),
        ({"Sec-Fetch-Site": "same-site"}, 403, "cross_site"),
        ({"Origin": "http://evil.example"}, 403, "cross_site"),
    ]
    for headers, code, error in refusals:
        status, body = await post(dashboard, "/api/dead/purge", {}, **headers)
        assert (status, body["error"]) == (code, error), headers
    # A form's body (what another site could send without asking) is not an action's.
    sent = {**GOOD, TOKEN_HEADER: dashboard.token, "Content-Type": "text/plain"}
    answer = await dashboard.post("/api/dead/purge", headers=sent, data="{}")
    assert answer.status_code == 415
    # Without the password, not even the token helps.
    anonymous = await dashboard.post("/api/dead/purge", headers={TOKEN_HEADER: dashboard.token})
    assert anonymous.status_code == 401
    assert await redis.llen(keys.dead) == 1  # nothing was purged
    # Its own origin (as a browser names it), with the token: done.
    same = {"Origin": "http://localhost"}  # the test client's Host
    assert await post(dashboard, "/api/dead/purge", {}, **same) == (200, {"purged": 1})


async def test_dead_letters_are_counted_per_queue_by_every_script_that_moves_them(
    dashboard: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    broker = Broker(redis, keys, queues=REGISTRY.queues, mode="at-most-once", dead_letter_max=4)
    dead = DeadLetters(redis, keys, REGISTRY)

    async def counted() -> dict[str, int]:
        stats = await read_stats(redis, keys, REGISTRY)
        return {q: n for q, n in stats.dead_by_queue.items() if n}

    async def actual() -> dict[str, int]:
        found: dict[str, int] = {}
        for entry in await dead.list():
            assert entry.queue is not None
            found[entry.queue] = found.get(entry.queue, 0) + 1
        return found

    emails = [email_job(n) for n in range(3)]
    for job in emails:
        await kill(broker, "email", job)
    profiles = [new_job("generate_profile", {"user_id": f"u{n}"}) for n in range(2)]
    for job in profiles[:1]:
        await kill(broker, "profile", job)
    assert await counted() == await actual() == {"email": 3, "profile": 1}
    # Past DEAD_LETTER_MAX (4 here) the oldest (an email's) is dropped, and uncounted.
    await kill(broker, "profile", profiles[1])
    assert await counted() == await actual() == {"email": 2, "profile": 2}
    assert await redis.hget(keys.stats, "dead_letters_dropped") == b"1"
    # The overview shows them per queue, from the count (no read of the list).
    _, overview = await get(dashboard, "/api/overview")
    assert {q["name"]: q["dead"] for q in overview["queues"]}["email"] == 2
    # Requeued and deleted ones are uncounted, once.
    entries = {e.job_id: e for e in await dead.list()}
    assert await dead.requeue_entry(entries[emails[2].id]) == "requeued"
    assert await dead.requeue_entry(entries[emails[2].id]) == "gone"
    assert await dead.delete_entry(entries[profiles[0].id])
    assert not await dead.delete_entry(entries[profiles[0].id])
    assert await counted() == await actual() == {"email": 1, "profile": 1}
    assert await dead.requeue() == (2, 0)
    assert await counted() == {}
    await kill(broker, "email", emails[0])
    assert await dead.purge() == 1
    assert await counted() == {} and not await redis.exists(keys.dead_by_queue)


async def test_retries_are_listed_soonest_first_run_now_or_deleted(
    dashboard: Any, broker: Broker, redis: aioredis.Redis, keys: Keys
) -> None:
    jobs = [email_job(n) for n in range(3)]
    for delay, job in zip((300, 100, 200), jobs, strict=True):
        retried = dataclasses.replace(job, attempt=2, enqueued_at=time.time() + delay)
        assert await broker.retry("email", job.encode(), retried, delay)
    status, listing = await get(dashboard, "/api/retries?queue=email&limit=2")
    assert status == 200 and (listing["queue"], listing["total"]) == ("email", 3)
    assert [e["id"] for e in listing["entries"]] == [jobs[1].id, jobs[2].id]
    first = listing["entries"][0]
    assert first["attempt"] == 3 and first["type"] == "welcome_email"
    assert 90 < first["due_at"] - time.time() <= 100
    # Run now: at the head of the line, stamped as queued now; once only.
    body = {"queue": "email", "ref": first["ref"]}
    assert await post(dashboard, "/api/retries/run", body) == (200, {"run": 1})
    [ran] = [decode(raw) for raw in await redis.lrange(keys.queue("email"), -1, -1)]
    assert (ran.id, ran.attempt) == (jobs[1].id, 2) and ran.enqueued_at <= time.time()
    assert (await post(dashboard, "/api/retries/run", body))[0] == 409
    assert await redis.llen(keys.queue("email")) == 1
    # Delete one; the last one stays.
    second = {"queue": "email", "ref": listing["entries"][1]["ref"]}
    assert await post(dashboard, "/api/retries/delete", second) == (200, {"deleted": 1})
    assert (await post(dashboard, "/api/retries/delete", second))[0] == 409
    _, rest = await get(dashboard, "/api/retries?queue=email")
    assert [e["id"] for e in rest["entries"]] == [jobs[0].id]
    # A queue that is not one.
    for path in ("/api/retries", "/api/retries?queue=nope"):
        status, answer = await get(dashboard, path)
        assert status == 400 and answer["error"] == "invalid_queue"
    status, answer = await post(dashboard, "/api/retries/run", {**second, "queue": "nope"})
    assert status == 400 and "email" in answer["message"]


async def test_the_pages_share_one_layout_and_name_their_view(dashboard: Any) -> None:
    for path, view in (("/", "overview"), ("/dead", "dead"), ("/retries", "retries")):
        page = await dashboard.get(path, headers=GOOD)
        text = await page.get_data(as_text=True)
        assert page.status_code == 200 and f'data-view="{view}"' in text
        assert f'<a href="{path}" aria-current="page">' in text
        assert '<dialog id="confirm">' in text
    retries = await (await dashboard.get("/retries", headers=GOOD)).get_data(as_text=True)
    for queue in REGISTRY.queues:
        assert f'<option value="{queue}">' in retries


async def test_the_cli_deletes_one_dead_letter_with_the_dashboards_code(
    redis_server: RedisServer, broker: Broker, redis: aioredis.Redis, keys: Keys
) -> None:
    jobs = [email_job(n) for n in range(2)]
    for job in jobs:
        await kill(broker, "email", job)
    deleted = admin(redis_server, "dead", "delete", jobs[0].id)
    assert (deleted.returncode, deleted.stdout.strip()) == (
        0,
        f"deleted the dead letter of job {jobs[0].id}",
    )
    left = [DeadLetter.decode(raw).job_id for raw in await redis.lrange(keys.dead, 0, -1)]
    assert left == [jobs[1].id]
    assert await redis.hget(keys.dead_by_queue, "email") == b"1"
    again = admin(redis_server, "dead", "delete", jobs[0].id)
    assert again.returncode == 1
    assert again.stderr.strip().endswith(f"job {jobs[0].id!r} is not among the dead letters")
