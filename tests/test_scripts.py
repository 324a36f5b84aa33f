"""Named script keys and arguments (pipeline.scripts): built into KEYS[i] and ARGV[j] once,
and each call's lists built from the same names, so one part cannot shift another's."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from pipeline.scripts import Signature

SIGNATURE = Signature(keys=("hash", "list"), args=("field", "value"))


def test_names_become_positions_and_constants_literals() -> None:
    source = SIGNATURE.source(
        "redis.call('HSET', $hash, $field, $value)\n"
        "redis.call('HINCRBY', $hash, $COUNTER, $STEP)\n"
        "for i = 1, #KEYS - $named_keys do redis.call('LPUSH', KEYS[$named_keys + i], "
        "ARGV[$named_args + i]) end",
        COUNTER="users",
        STEP=2,
    )
    assert source == (
        "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])\n"
        "redis.call('HINCRBY', KEYS[1], 'users', 2)\n"
        "for i = 1, #KEYS - 2 do redis.call('LPUSH', KEYS[2 + i], ARGV[2 + i]) end"
    )


def test_a_name_the_signature_lacks_fails_when_the_script_is_built() -> None:
    with pytest.raises(KeyError, match="missing"):
        SIGNATURE.source("return $missing")
    with pytest.raises(ValueError, match="used twice"):
        Signature(keys=("a",), args=("a",))
    with pytest.raises(ValueError, match="also a key"):
        SIGNATURE.source("return $hash", hash="x")
    with pytest.raises(ValueError, match="not a plain word"):
        SIGNATURE.source("return $X", X="x') redis.call('FLUSHALL")


def test_a_part_added_after_keeps_every_name_in_place() -> None:
    part = Signature(keys=("state",), args=("limit",))
    whole = SIGNATURE + part
    assert whole.source("$hash $list $state $field $value $limit") == (
        "KEYS[1] KEYS[2] KEYS[3] ARGV[1] ARGV[2] ARGV[3]"
    )
    keys, args = whole.call(
        {"state": "s", "list": "l", "hash": "h"},  # any order: names, not places
        {"limit": 5, "value": "v", "field": "f"},
        tail_keys=["q1", "q2"],
        tail_args=["j1", "j2"],
    )
    assert (keys, args) == (["h", "l", "s", "q1", "q2"], ["f", "v", 5, "j1", "j2"])
    with pytest.raises(KeyError, match="limit"):
        whole.call({"state": "s", "list": "l", "hash": "h"}, {"value": "v", "field": "f"})


async def test_a_built_script_runs_on_redis(redis: aioredis.Redis) -> None:
    source = SIGNATURE.source(
        "redis.call('HSET', $hash, $field, $value)\n"
        "for i = 1, #KEYS - $named_keys do\n"
        "  redis.call('RPUSH', KEYS[$named_keys + i], ARGV[$named_args + i])\n"
        "end\n"
        "return redis.call('HINCRBY', $hash, $COUNTER, 1)",
        COUNTER="runs",
    )
    keys, args = SIGNATURE.call(
        {"hash": "h", "list": "l"}, {"field": "f", "value": "v"}, ["q"], ["job"]
    )
    assert await redis.eval(source, len(keys), *keys, *args) == 1
    assert await redis.hgetall("h") == {b"f": b"v", b"runs": b"1"}
    assert await redis.lrange("q", 0, -1) == [b"job"]
