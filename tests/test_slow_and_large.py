"""Slow and oversized clients against a real hypercorn, over raw sockets: a trickled body is cut
off with 408 without holding other requests back; huge headers (431) and bodies (413) are
refused before they are read; a Host header that is no host name is a 400."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.keys import Keys
from tests.helpers import RedisServer
from tests.processes import child_env, request, web

SIGNUP = b"POST /signup HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


async def read_response(reader: asyncio.StreamReader, timeout: float = 10) -> tuple[int, bytes]:
    """The status and the body of one response (Content-Length framed)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await asyncio.wait_for(reader.readexactly(length), timeout)


async def closed(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """Whether the server closes the connection (rather than waiting for more)."""
    try:
        await asyncio.wait_for(reader.read(), timeout)  # whatever is left, up to the end
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def test_a_trickled_body_gets_408_and_holds_no_one_back(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys, asgi_server: str
) -> None:
    body = orjson.dumps({"username": "slowpoke", "email": "slow@example.com"})
    env = child_env(redis_server, BODY_TIMEOUT="1.5")
    async with web(spawn, env, server=asgi_server) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(SIGNUP + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1])
        await writer.drain()
        sent = 1  # bytes of the body so far

        async def trickle() -> None:
            nonlocal sent
            for byte in body[1:-1]:  # never the last byte
                await asyncio.sleep(0.1)
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1

        trickling = asyncio.create_task(trickle())
        answer = asyncio.create_task(read_response(reader))
        # Meanwhile, the same worker answers an honest signup, before the slow one's answer.
        status, _, _ = await request(
            port, "POST", "/signup", {"username": "honest", "email": "honest@example.com"}
        )
        assert status == 201
        assert not answer.done()

        status, text = await answer
        # Cut off by the timeout while the body was still coming, not at its end.
        assert not trickling.done()
        assert sent < len(body) - 1
        trickling.cancel()
        assert status == 408
        assert orjson.loads(text)["error"] == "request_timeout"
        assert await closed(reader)
        writer.close()
    assert await redis.hget(keys.username_claims, "slowpoke") is None
    assert await redis.hget(keys.stats, "users") == b"1"


async def test_huge_headers_get_431_before_they_are_all_sent(
    spawn: Any, redis_server: RedisServer, asgi_server: str
) -> None:
    async with web(spawn, child_env(redis_server), server=asgi_server) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(SIGNUP)
        for n in range(40):  # 40 headers of 1 KiB, never finished with a blank line
            writer.write(f"X-Padding-{n}: {'a' * 1000}\r\n".encode())
        # The server may answer and close before taking the rest (a reset of the writes): its
        # answer came first, and is what is checked next.
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 431 ")
        assert await closed(reader)
        writer.close()
        # The worker is fine.
        assert (await request(port, "GET", "/healthz"))[0] == 200


async def test_a_huge_declared_body_gets_413_before_any_of_it_is_sent(
    spawn: Any, redis_server: RedisServer, asgi_server: str
) -> None:
    async with web(spawn, child_env(redis_server), server=asgi_server) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(SIGNUP + b"Content-Length: 1000000000\r\n\r\n")
        await writer.drain()
        status, answer = await read_response(reader)
        assert status == 413
        assert orjson.loads(answer)["error"] == "request_entity_too_large"
        assert await closed(reader)
        writer.close()


async def test_a_chunked_body_is_cut_off_with_413_once_it_passes_the_limit(
    spawn: Any, redis_server: RedisServer, asgi_server: str
) -> None:
    env = child_env(redis_server, MAX_BODY_BYTES="4096")
    async with web(spawn, env, server=asgi_server) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(SIGNUP + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 1024
        sent = 0
        answer = None
        # Keep sending 1 KiB chunks (up to 1 MiB) until the answer comes.
        for _ in range(1024):
            writer.write(b"400\r\n" + chunk + b"\r\n")
            await writer.drain()
            sent += len(chunk)
            try:
                answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 0.05)
                break
            except TimeoutError:
                continue
        assert answer is not None and answer.startswith(b"HTTP/1.1 413 ")
        assert sent <= 16 * 1024
        writer.close()


async def test_a_host_header_that_is_no_host_name_gets_400_and_writes_nothing(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys, asgi_server: str
) -> None:
    """A Host header the routes cannot be bound to (not a valid international domain name)
    is bad input: a JSON 400 naming it, not a 500, and the signup is not written."""
    body = orjson.dumps({"username": "badhost", "email": "badhost@example.com"})
    async with web(spawn, child_env(redis_server), server=asgi_server) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /signup HTTP/1.1\r\nHost: a..b\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        status, answer = await read_response(reader)
        writer.close()
        assert status == 400
        assert orjson.loads(answer) == {
            "error": "bad_request",
            "message": "the Host header is not a valid host name",
        }
        assert (await request(port, "GET", "/healthz"))[0] == 200
    assert await redis.hget(keys.username_claims, "badhost") is None
