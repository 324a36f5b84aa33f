"""A flood of bad jobs cannot exhaust Redis: dead letters are capped (DEAD_LETTER_MAX, the
oldest dropped and counted), and per-job bookkeeping is cleared or expires."""

from __future__ import annotations

import orjson
import redis.asyncio as aioredis

from pipeline.dead import DeadLetter
from pipeline.keys import Keys
from pipeline.queue import Broker, DirectQueue, delivery_id
from pipeline.stats import read_stats
from tests.helpers import REGISTRY, eventually


async def _exists(redis: aioredis.Redis, key: str, expected: int) -> bool:
    return int(await redis.exists(key)) == expected


async def test_dead_letters_keep_the_newest_and_count_what_they_drop(
    redis: aioredis.Redis, keys: Keys
) -> None:
    broker = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="c1", dead_letter_max=3)
    queue = DirectQueue(redis, keys, REGISTRY)
    for n in range(5):
        await queue.push("welcome_email", {"n": n})
        raw = await broker.fetch("email", 1)
        assert raw is not None
        entry = DeadLetter.for_job("email", raw, f"bad job {n}").encode()
        assert await broker.dead_letter("email", raw, entry, delivery_id(raw))
    reasons = [orjson.loads(e)["reason"] for e in await redis.lrange(keys.dead, 0, -1)]
    assert reasons == ["bad job 4", "bad job 3", "bad job 2"]
    stats = await read_stats(redis, keys, REGISTRY)
    assert (stats.dead_letter, stats.counters["dead_letters_dropped"]) == (3, 2)


async def test_dead_letters_from_recovery_are_capped_too(redis: aioredis.Redis, keys: Keys) -> None:
    await redis.lpush(keys.dead, *[b"{}"] * 2)
    sweeper = Broker(redis, keys, queues=REGISTRY.queues, dead_letter_max=2)
    victim = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="victim")
    await victim.heartbeat(0.05, {})
    for n in range(3):
        await DirectQueue(redis, keys, REGISTRY).push("generate_profile", {"n": n})
        assert await victim.fetch("profile", 1) is not None
    await eventually(lambda: _exists(redis, keys.lease("victim"), 0))
    # max_deliveries 1: each job that died with its consumer is dead-lettered at once.
    assert await sweeper.recover("victim", max_deliveries=1, forget_after=60) == (0, 3)
    assert await redis.llen(keys.dead) == 2
    assert await redis.hget(keys.stats, "dead_letters_dropped") == b"3"
    assert await redis.hlen(keys.deliveries) == 0


async def test_an_undecodable_jobs_delivery_count_is_cleared_when_it_is_dead_lettered(
    redis: aioredis.Redis, keys: Keys
) -> None:
    for raw in (b"\xff not json", b'{"id": "x1", "but": "no envelope"}'):
        victim = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="victim")
        await victim.heartbeat(0.05, {})
        await redis.lpush(keys.queue("email"), raw)
        assert await victim.fetch("email", 1) == raw
        await eventually(lambda: _exists(redis, keys.lease("victim"), 0))
        sweeper = Broker(redis, keys, queues=REGISTRY.queues)
        assert await sweeper.recover("victim", max_deliveries=3, forget_after=60) == (1, 0)
        assert await redis.hlen(keys.deliveries) == 1  # one death counted, under its id
        consumer = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="c2")
        assert await consumer.fetch("email", 1) == raw
        entry = DeadLetter.for_job("email", raw, "undecodable job").encode()
        assert await consumer.dead_letter("email", raw, entry, delivery_id(raw))
        assert await redis.hlen(keys.deliveries) == 0


async def test_a_dead_letter_reads_the_same_whoever_wrote_it(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # One definition (pipeline.dead.DeadLetter): the consumer's entry for a failed job and
    # the recovery script's for a poison pill decode into the same structure.
    victim = Broker(redis, keys, queues=REGISTRY.queues, consumer_id="victim")
    await victim.heartbeat(0.05, {})
    job = await DirectQueue(redis, keys, REGISTRY).push("generate_profile", {"n": 1})
    raw = await victim.fetch("profile", 1)
    assert raw is not None
    await eventually(lambda: _exists(redis, keys.lease("victim"), 0))
    assert await Broker(redis, keys, queues=REGISTRY.queues).recover(
        "victim", max_deliveries=1, forget_after=60
    ) == (0, 1)
    written = DeadLetter.for_job("email", raw, "failed 5 attempts", job=job, error="ValueError: x")
    await redis.lpush(keys.dead, written.encode())
    mine, recovered = [DeadLetter.decode(e) for e in await redis.lrange(keys.dead, 0, -1)]
    assert (recovered.queue, recovered.id, recovered.deliveries) == ("profile", job.id, 1)
    assert recovered.reason == "delivered 1 times, each to a consumer that died holding it"
    assert (mine.queue, mine.id, mine.type, mine.attempts, mine.error) == (
        "email",
        job.id,
        "generate_profile",
        1,
        "ValueError: x",
    )
    for entry in (mine, recovered):
        assert entry.job == job and entry.job_id == job.id
        assert isinstance(entry.failed_at, float)
        assert DeadLetter.decode(entry.encode()).to_json() == entry.to_json()
