"""What the tests share besides fixtures: the server this run tests, the SMTP sink, waiting
with a deadline, reading metrics. (Fixtures are in ``conftest``.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from quart.typing import TestClientProtocol

from devtools.embedded_redis import find_redis_server, server_args, server_version
from pipeline.registry import load_registry

#: The suite's rate limit, unless a test sets its own: every signup from 127.0.0.1 is
#: counted by it, and none reaches it.
TEST_RATE_LIMIT = "1000000/1"

#: The server binary this run tests: ``REDIS_SERVER`` (the CI matrix sets it), else the
#: embedded one; never whatever PATH holds, so a run always says what it tested.
REDIS_BINARY = find_redis_server(system_first=False)
REDIS_VERSION = server_version(REDIS_BINARY)

#: The default reactions, which the suite runs with unless a test loads others. Product code
#: is always handed its registry (from REACTIONS); tests pass this one.
REGISTRY = load_registry()


def debian_redis() -> str:
    """Debian's redis-server 7.0 (built with TLS), which ``make test`` unpacks and names in
    ``REDIS_TLS_SERVER``. Missing, a test that needs it fails where CI requires it
    (``REDIS_TLS_REQUIRED``) and is skipped elsewhere."""
    binary = os.environ.get("REDIS_TLS_SERVER", "")
    if not os.access(binary, os.X_OK):
        message = f"no Debian redis-server (REDIS_TLS_SERVER={binary!r}); `make test` gets one"
        if os.environ.get("REDIS_TLS_REQUIRED"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def suite_server_args(port: int, directory: Path, *, appendonly: bool = False) -> list[str]:
    """The command line of a server of the kind this run tests."""
    return server_args(port, directory, appendonly=appendonly, binary=REDIS_BINARY)


@dataclass
class RedisServer:
    """A redis-server process the suite started."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass
class SmtpSink:
    """A real SMTP server (aiosmtpd) that keeps what it receives.

    ``delay`` makes it slow: at ``stall_at`` "data" it stalls after receiving the message,
    before accepting it; at "rcpt" before it has the message at all. ``reject`` (an SMTP reply
    such as "550 ...") refuses every recipient. ``started`` counts messages begun (RCPT)."""

    port: int
    delay: float = 0.0
    stall_at: str = "data"
    reject: str | None = None
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: int = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.reject:
            return self.reject
        with self.lock:
            self.started += 1
        if self.delay and self.stall_at == "rcpt":
            await asyncio.sleep(self.delay)  # a slow server, not synchronisation
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay and self.stall_at == "data":
            await asyncio.sleep(self.delay)  # a slow server, not synchronisation
        message = message_from_bytes(envelope.content, policy=policy.default)
        with self.lock:
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self.messages.append(message)  # type: ignore[arg-type]
        return "250 OK"

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def recipients(self) -> list[str]:
        with self.lock:
            return [to for _, tos in self.envelopes for to in tos]


# --- waiting ------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 10.0,
    what: str = "condition",
) -> None:
    """Poll ``check`` until it is true, failing the test when ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


# --- metrics ------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text format -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(client: TestClientProtocol) -> Samples:
    """GET /metrics through the app's test client, parsed."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    return parse_metrics(await response.get_data(as_text=True))


async def client_commands(
    redis_server: RedisServer, redis: Any, action: Callable[[], Awaitable[None]]
) -> list[str]:
    """The commands clients send Redis while ``action`` runs, as ``MONITOR`` sees them (the
    names only, in order): one per round trip's command, a script's own commands left out."""
    import redis.asyncio as aioredis

    seen: list[str] = []
    watcher_client = aioredis.Redis.from_url(redis_server.url)
    ready = asyncio.Event()

    async def watch() -> None:
        async with watcher_client.monitor() as monitor:
            ready.set()
            async for command in monitor.listen():
                if command.get("client_type") == "lua":
                    continue  # run inside a script, not a round trip
                if command["command"] == "ECHO end-of-watch":
                    return
                seen.append(command["command"].split()[0].upper())

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(ready.wait(), 5)
        await redis.ping()  # MONITOR is active once its reply arrived; this orders us after it
        await action()
        await redis.echo("end-of-watch")
        await asyncio.wait_for(watcher, 5)
    finally:
        watcher.cancel()
        await watcher_client.aclose()
    seen.remove("PING")
    return seen
