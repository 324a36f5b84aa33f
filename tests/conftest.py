"""Fixtures: a real redis-server for the session, a real SMTP server, the app under test."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio as aioredis
from aiosmtpd.controller import Controller
from quart.typing import TestAppProtocol, TestClientProtocol

if TYPE_CHECKING:
    from tests.processes import Child

from pipeline.embedded_redis import (
    find_redis_server,
    free_port,
    server_args,
    server_version,
    wait_until_ready,
)
from pipeline.keys import Keys
from pipeline.settings import Settings
from service.app import create_app

#: The suite's rate limit, unless a test sets its own: every signup from 127.0.0.1 is
#: counted by it, and none reaches it.
TEST_RATE_LIMIT = "1000000/1"

#: The server binary this run tests: ``REDIS_SERVER`` (the CI matrix sets it), else the
#: embedded one; never whatever PATH holds, so a run always says what it tested.
REDIS_BINARY = find_redis_server(system_first=False)
REDIS_VERSION = server_version(REDIS_BINARY)


def pytest_report_header() -> str:
    return f"redis server: {REDIS_VERSION} ({REDIS_BINARY})"


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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    directory = tmp_path_factory.mktemp("redis")
    port = free_port()
    process = subprocess.Popen(suite_server_args(port, directory), stdout=subprocess.DEVNULL)
    try:
        wait_until_ready(port, time.monotonic() + 15, process)
        yield RedisServer(port, directory, process)
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client on the suite's Redis, flushed before each test."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=10)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def make_settings(redis_server: RedisServer) -> Callable[..., Settings]:
    """Settings from an explicit mapping (never os.environ), pointed at the suite's Redis."""

    def make(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        settings = Settings.from_env(
            {"REDIS_URL": redis_server.url, "RATE_LIMIT": TEST_RATE_LIMIT, **(env or {})}
        )
        return dataclasses.replace(settings, **overrides)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix)


@pytest.fixture
async def app(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[TestAppProtocol]:
    """The app with its serving hooks run (Redis opened and closed)."""
    async with create_app(settings).test_app() as test_app:
        yield test_app


@pytest.fixture
def client(app: TestAppProtocol) -> TestClientProtocol:
    return app.test_client()


# --- SMTP -------------------------------------------------------------------------------


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


@pytest.fixture
def smtp_server() -> Iterator[SmtpSink]:
    sink = SmtpSink(port=free_port())
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()


# --- processes --------------------------------------------------------------------------


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start subprocesses (see tests.processes.Child); every one is stopped at teardown."""
    from tests.processes import ROOT, Child

    children: list[Child] = []

    def start(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> Child:
        child = Child(argv, env, tmp_path / f"child-{len(children)}.log", cwd)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


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
