"""A minimal HTTP/1.1 client over one keep-alive connection: just enough to load-test our own
JSON API fast (a general client costs the generator more CPU per request than the server).

It sends ``Content-Length`` bodies and reads ``Content-Length`` responses; anything else is
an error, which the server under test never sends.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

MAX_HEAD: Final = 64 * 1024


class HttpError(Exception):
    """The connection failed or the server answered something this client cannot read."""


def parse_url(url: str) -> tuple[str, int]:
    """(host, port) of an ``http://host[:port]`` URL, or ValueError saying why not."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("expected http://host[:port]")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("the URL's port is not a number from 0 to 65535") from None
    return parts.hostname, port


class Connection:
    """One keep-alive connection, reopened after a failure or a ``Connection: close``."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self._host, self._port, self._timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        """Send one request; the status and the body. Raises :class:`HttpError`."""
        try:
            return await asyncio.wait_for(
                self._exchange(method, path, body, content_type), self._timeout
            )
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
        ) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        except HttpError:
            self.close()
            raise

    async def _exchange(
        self, method: str, path: str, body: bytes, content_type: str
    ) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, limit=MAX_HEAD
            )
        assert self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self._host_header
        if body:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode()
        self._writer.write(head + b"\r\n" + body)
        raw = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw[:-4].split(b"\r\n")
        try:
            status = int(status_line.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(f"not an HTTP status line: {status_line[:80]!r}") from None
        length, close = None, False
        for line in lines:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise HttpError("chunked responses are not supported")
        payload = await self._reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, payload

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def poll_stats(connection: Connection) -> dict[str, Any] | None:
    """The service's ``GET /stats``, or None when it failed or did not answer 200 (a poller
    carries on and asks again)."""
    try:
        status, body = await connection.request("GET", "/stats")
    except HttpError:
        return None
    if status != 200:
        return None
    stats: dict[str, Any] = orjson.loads(body)
    return stats
