"""Fixtures: a real redis-server for the session, a real SMTP server, the app under test."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio as aioredis
from aiosmtpd.controller import Controller
from quart import Quart
from quart.testing import QuartClient
from quart.typing import TestAppProtocol, TestClientProtocol

if TYPE_CHECKING:
    from tests.processes import Child

from devtools.embedded_redis import free_port, wait_until_ready
from pipeline.keys import Keys
from pipeline.plan import resolve
from pipeline.settings import Settings
from service.app import create_app
from tests.helpers import (
    REDIS_BINARY,
    REDIS_VERSION,
    TEST_RATE_LIMIT,
    RedisServer,
    SmtpSink,
    suite_server_args,
)


def pytest_report_header() -> str:
    return f"redis server: {REDIS_VERSION} ({REDIS_BINARY})"


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


class LoopbackClient(QuartClient):
    """Quart's test client, its requests coming from 127.0.0.1 as a real server would say
    (Quart's own gives no peer at all), unless a test gives its own ``scope_base``."""

    async def open(
        self, *args: Any, scope_base: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        if scope_base is None:
            scope_base = {"client": ("127.0.0.1", 40000)}
        return await super().open(*args, scope_base=scope_base, **kwargs)


# Every app the tests build: OPS_ALLOW's operational routes answer a loopback client.
Quart.test_client_class = LoopbackClient


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
    async with create_app(resolve(settings)).test_app() as test_app:
        yield test_app


@pytest.fixture
def client(app: TestAppProtocol) -> TestClientProtocol:
    return app.test_client()


# --- SMTP -------------------------------------------------------------------------------


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


@pytest.fixture(params=["hypercorn", "uvicorn"])
def asgi_server(request: pytest.FixtureRequest) -> str:
    """Each supported ASGI server in turn (tests/processes.py ``web(server=...)``): the
    process-level web tests hold on both."""
    return str(request.param)


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
