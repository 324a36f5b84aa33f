"""Auto-pipelining against the real Redis: one round trip per loop tick whatever the scripts
(and reads), each caller its own answer, recovery from a lost script cache, a failed round
trip fails all."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from devtools.embedded_redis import free_port
from pipeline.batching import AutoPipeline, MergedScript, ScriptBatcher

# Echo ARGV[1] after counting it under KEYS[1]; refuse 'bad'.
ECHO = """
if ARGV[1] == 'bad' then return redis.error_reply('ERR refused ' .. ARGV[1]) end
redis.call('INCR', KEYS[1])
return ARGV[1]
"""


# A script that serves many callers in one call: each ARGV is one caller's part, answered with
# "<part>!" after counting the part under KEYS[1]; the call counts itself under KEYS[2].
# "bad" fails the whole call; "short" answers one entry too few.
MERGED = """
for i = 1, #ARGV do
  if ARGV[i] == 'bad' then return redis.error_reply('ERR refused bad') end
end
redis.call('INCR', KEYS[2])
redis.call('INCRBY', KEYS[1], #ARGV)
local answers = {}
for i = 1, #ARGV do answers[i] = ARGV[i] .. '!' end
if ARGV[1] == 'short' then answers[#answers] = nil end
return answers
"""


def merged_parts(parts: list[str]) -> tuple[list[str], list[str]]:
    return ["parts", "calls"], parts


# Count KEYS[1] up by ARGV[1]; answer the new count.
ADD = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


class CountingPipeline(AutoPipeline):
    """Counts the round trips it makes (its own code; Redis is real)."""

    trips = 0

    async def _round_trip(self, connection, commands):  # type: ignore[no-untyped-def]
        self.trips += 1
        return await super()._round_trip(connection, commands)


async def test_calls_in_one_tick_share_one_round_trip_and_get_their_own_answers(
    redis: aioredis.Redis,
) -> None:
    await redis.script_load(ECHO)  # cached already: no NOSCRIPT round (tested below)
    pipeline = CountingPipeline(redis)
    batcher = pipeline.script(ECHO)
    calls = [batcher(["count"], [f"v{i}"]) for i in range(20)]
    assert await asyncio.gather(*calls) == [f"v{i}".encode() for i in range(20)]
    assert pipeline.trips == 1
    assert await redis.get("count") == b"20"
    # The next tick is the next round trip.
    assert await batcher(["count"], ["again"]) == b"again"
    assert pipeline.trips == 2


class HeldPipeline(CountingPipeline):
    """Holds each round trip until ``release`` is set, noting each batch's size."""

    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__(redis)
        self.release = asyncio.Event()
        self.out = asyncio.Event()
        self.sizes: list[int] = []

    async def _round_trip(self, connection, commands):  # type: ignore[no-untyped-def]
        self.sizes.append(len(commands))
        self.out.set()
        await self.release.wait()
        return await super()._round_trip(connection, commands)


async def test_calls_made_while_a_round_trip_is_out_go_together_in_the_next(
    redis: aioredis.Redis,
) -> None:
    await redis.script_load(ECHO)
    pipeline = HeldPipeline(redis)
    batcher = pipeline.script(ECHO)
    first = batcher(["count"], ["first"])
    await pipeline.out.wait()  # the first round trip is out, and held
    later = []
    for i in range(5):  # each in a tick of its own
        later.append(batcher(["count"], [f"v{i}"]))
        await asyncio.sleep(0)
    assert pipeline.sizes == [1]  # nothing more sent while it is out
    pipeline.release.set()
    assert await first == b"first"
    assert await asyncio.gather(*later) == [f"v{i}".encode() for i in range(5)]
    assert pipeline.sizes == [1, 5]
    assert await redis.get("count") == b"6"


async def test_other_scripts_and_reads_of_the_tick_ride_the_same_round_trip(
    redis: aioredis.Redis,
) -> None:
    for source in (ECHO, ADD):
        await redis.script_load(source)
    pipeline = CountingPipeline(redis)
    echo, add = pipeline.script(ECHO), pipeline.script(ADD)
    assert pipeline.script(ECHO) is echo  # one caller per script
    await redis.set("seen", "x")
    results = await asyncio.gather(
        echo(["count"], ["a"]), add(["total"], [5]), pipeline.read("EXISTS", "seen"),
        add(["total"], [2]), pipeline.read("GET", "count"),
    )  # fmt: skip
    assert results == [b"a", 5, 1, 7, b"1"]
    assert pipeline.trips == 1


async def test_an_error_belongs_to_its_own_call(redis: aioredis.Redis) -> None:
    batcher = ScriptBatcher(redis, ECHO)
    results = await asyncio.gather(
        batcher(["count"], ["a"]), batcher(["count"], ["bad"]), batcher(["count"], ["b"]),
        return_exceptions=True,
    )  # fmt: skip
    assert results[0] == b"a" and results[2] == b"b"
    assert isinstance(results[1], ResponseError) and "refused bad" in str(results[1])
    assert await redis.get("count") == b"2"


async def test_a_lost_script_cache_is_reloaded(redis: aioredis.Redis) -> None:
    batcher = ScriptBatcher(redis, ECHO)
    assert await batcher(["count"], ["first"]) == b"first"
    await redis.script_flush()
    assert await asyncio.gather(batcher(["count"], ["x"]), batcher(["count"], ["y"])) == [
        b"x",
        b"y",
    ]
    assert await redis.get("count") == b"3"


async def test_a_failed_round_trip_fails_every_call_of_the_batch() -> None:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5)
    batcher = ScriptBatcher(client, ECHO)
    results = await asyncio.gather(
        *(batcher(["count"], [str(i)]) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    await client.aclose()


async def test_a_busy_spell_borrows_one_connection_and_gives_it_back(
    redis_server: Any,
) -> None:
    """Round trips back to back (each caller asking again as soon as it is answered) share
    one connection from the pool, which goes back when nothing is pending: with a pool of
    one, a plain command still gets it, and a lost script cache is loaded again on it."""
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_server.url, max_connections=1, timeout=0.5
    )
    client = aioredis.Redis.from_pool(pool)
    borrowed = 0
    get_connection = pool.get_connection

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal borrowed
        borrowed += 1
        return await get_connection(*args, **kwargs)

    pool.get_connection = counting  # type: ignore[method-assign]
    try:
        await client.flushall()
        borrowed = 0
        pipeline = CountingPipeline(client)
        batcher = pipeline.script(ECHO)

        async def caller(name: str) -> list[bytes]:
            return [await batcher(["count"], [f"{name}{i}"]) for i in range(5)]

        answers = await asyncio.gather(caller("a"), caller("b"))
        assert answers == [[f"{n}{i}".encode() for i in range(5)] for n in "ab"]
        assert pipeline.trips >= 5 and borrowed == 1
        assert await asyncio.wait_for(client.get("count"), 5) == b"10"  # the pool's one is back
        await client.script_flush()
        borrowed = 0
        assert await batcher(["count"], ["again"]) == b"again"
        assert borrowed == 1  # the script loaded again on the connection its spell holds
    finally:
        await client.aclose()


async def test_a_reply_late_past_the_socket_timeout_fails_its_batch_and_the_next_connects(
    redis_server: Any,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=0.2)
    try:
        pipeline = AutoPipeline(client)
        late = await asyncio.gather(
            pipeline.read("BLPOP", "nothing-here", 2), pipeline.read("PING"),
            return_exceptions=True,
        )  # fmt: skip
        assert all(isinstance(r, RedisTimeoutError) for r in late), late
        assert await pipeline.read("PING") in (b"PONG", True)
    finally:
        await client.aclose()


@pytest.mark.parametrize("cancelled", [True, False])
async def test_a_cancelled_caller_does_not_stop_the_batch(
    redis: aioredis.Redis, cancelled: bool
) -> None:
    batcher = ScriptBatcher(redis, ECHO)
    first, second = batcher(["count"], ["a"]), batcher(["count"], ["b"])
    if cancelled:
        first.cancel()
    assert await second == b"b"
    assert await redis.get("count") == b"2"  # the cancelled caller's script ran too


async def test_a_consumer_process_takes_and_runs_effects_in_one_round_trip(
    redis: aioredis.Redis, make_settings: Any
) -> None:
    """As ``python -m consumers`` builds them, the broker's takes of two queues and a
    handler's effect of the same tick reach Redis in one read."""
    from consumers.cli import consumer_parts
    from pipeline.keys import Keys
    from pipeline.plan import resolve

    keys = Keys("signup")
    for queue in ("email", "marketing"):
        await redis.lpush(keys.queue(queue), f"{queue}-1")
    await redis.script_load(ECHO)
    ctx, broker = consumer_parts(redis, resolve(make_settings({})))
    await broker.take("email", 0)  # its script loaded: no NOSCRIPT round below

    async def reads() -> int:
        return int((await redis.info("stats"))["total_reads_processed"])

    async def effect_of_a_job() -> bytes:
        return bytes(await ctx.effect(ECHO)(["n"], ["x"]))

    before = await reads()
    taken = await asyncio.gather(
        broker.take("email", 1), broker.take("marketing", 1), effect_of_a_job()
    )
    assert taken == [([b"email-1"], 0), ([b"marketing-1"], 0), b"x"]
    assert await reads() - before == 2  # the batch's read, and the INFO that counts it


async def test_a_merged_script_serves_the_parts_of_a_tick_in_one_call_each_its_own_answer(
    redis: aioredis.Redis,
) -> None:
    await redis.script_load(MERGED)
    pipeline = HeldPipeline(redis)
    merged: MergedScript[str] = MergedScript(redis, MERGED, merged_parts, pipeline=pipeline)
    first = [merged(f"a{i}") for i in range(3)]  # one tick: one call
    await pipeline.out.wait()  # that call is out, and held
    later = []
    for i in range(4):  # each in a tick of its own, while the first is out
        later.append(merged(f"b{i}"))
        await asyncio.sleep(0)
    assert pipeline.sizes == [1]
    pipeline.release.set()
    assert await asyncio.gather(*first) == [b"a0!", b"a1!", b"a2!"]
    assert await asyncio.gather(*later) == [b"b0!", b"b1!", b"b2!", b"b3!"]
    assert pipeline.sizes == [1, 1]  # one command per round trip: the merged call
    assert (await redis.get("calls"), await redis.get("parts")) == (b"2", b"7")


async def test_a_merged_call_that_fails_fails_each_of_its_parts(redis: aioredis.Redis) -> None:
    merged: MergedScript[str] = MergedScript(redis, MERGED, merged_parts)
    refused = await asyncio.gather(merged("a"), merged("bad"), return_exceptions=True)
    assert all(isinstance(r, ResponseError) and "refused bad" in str(r) for r in refused)
    short = await asyncio.wait_for(
        asyncio.gather(merged("short"), merged("b"), return_exceptions=True), 5
    )
    assert all(isinstance(r, ResponseError) and "2 parts" in str(r) for r in short), short
    assert await asyncio.gather(merged("c"), merged("d")) == [b"c!", b"d!"]  # the next call


async def test_a_merged_script_is_loaded_again_when_redis_lost_it(redis: aioredis.Redis) -> None:
    merged: MergedScript[str] = MergedScript(redis, MERGED, merged_parts)
    assert await merged("first") == b"first!"
    await redis.script_flush()
    assert await asyncio.gather(merged("x"), merged("y")) == [b"x!", b"y!"]
    assert await redis.get("parts") == b"3"


async def test_a_merged_call_whose_round_trip_fails_fails_its_parts_and_the_next_call_goes() -> (
    None
):
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5)
    merged: MergedScript[str] = MergedScript(client, MERGED, merged_parts)
    for _ in range(2):  # the first call's failure does not strand the parts of the next
        results = await asyncio.wait_for(
            asyncio.gather(merged("a"), merged("b"), return_exceptions=True), 5
        )
        assert all(isinstance(r, RedisConnectionError) for r in results), results
    await client.aclose()
