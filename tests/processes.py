"""Running the processes as deployed, for tests: children in their own process group, HTTP
over a raw connection, a hypercorn web service, jobs pushed straight onto a queue."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from devtools.embedded_redis import free_port
from pipeline.keys import Keys
from pipeline.queue import DirectQueue
from service.uvicorn_options import UVICORN_OPTIONS
from tests.helpers import REGISTRY, TEST_RATE_LIMIT, RedisServer, eventually

ROOT = Path(__file__).resolve().parent.parent


def child_env(redis_server: RedisServer | str, **extra: str) -> dict[str, str]:
    """The environment of a child process: this one's, without Redis, SMTP, consumer or
    dashboard settings, pointed at ``redis_server`` (or a Redis URL), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "SMTP_", "CONSUMER_", "DASHBOARD_"))
    }
    url = redis_server if isinstance(redis_server, str) else redis_server.url
    env.update({"REDIS_URL": url, "PYTHONUNBUFFERED": "1", "FETCH_TIMEOUT": "0.5"})
    # The Procfile's dashboard, where a test runs it (honcho, make run): never port 9181,
    # which another process on this machine may hold.
    env["DASHBOARD_PORT"] = str(free_port())
    # Every signup of the suite comes from 127.0.0.1: a limit that counts them but never bites.
    env["RATE_LIMIT"] = TEST_RATE_LIMIT
    env.update(extra)
    return env


class Child:
    """A subprocess whose stderr goes to a file the test can poll."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> None:
        self.log = log
        self._file = log.open("wb")
        # Its own session: teardown can reach everything it started (hypercorn's workers).
        self.process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def stop(self, timeout: float = 15) -> int:
        """SIGTERM, as an operator stops it, and its exit code once it has exited."""
        self.signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout} s:\n{self.output()}")
            await asyncio.sleep(0.02)
        return self.process.returncode

    def close(self) -> None:
        """Stop the child's whole process group: SIGTERM, then SIGKILL if it lingers."""
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if not self._signal_group(signum) or self._group_gone(within=10):
                break
        self.process.wait(10)
        self._file.close()

    def _signal_group(self, signum: int) -> bool:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def _group_gone(self, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.process.poll()  # reap the leader: a zombie still counts as a member
            if not self._signal_group(0):
                return True
            time.sleep(0.05)
        return False


def consumer_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "consumers", *args]


def admin(redis_server: RedisServer, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m consumers <args>``: an operator's command, run to completion."""
    return subprocess.run(
        [sys.executable, "-m", "consumers", *args],
        env=child_env(redis_server, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One HTTP/1.1 request over a fresh connection; the status and the JSON body."""
    status, _, payload = await request(port, method, path, body)
    return status, payload


async def request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 request over a fresh connection; the status, the headers (names in lower
    case) and the body (decoded if JSON)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = orjson.dumps(body) if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    writer.write(head.encode() + b"\r\n" + data)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head_bytes, _, payload = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    decoded: Any = payload
    if found.get("content-type", "").startswith("application/json") and payload:
        decoded = orjson.loads(payload)
    elif not payload:
        decoded = None
    return int(status_line.split()[1]), found, decoded


#: The supported ASGI servers: hypercorn (the default, the Procfile's) and uvicorn.
SERVERS: Final = ("hypercorn", "uvicorn")


def server_argv(server: str, port: int, workers: int) -> list[str]:
    """The command line the README gives for ``server``, on 127.0.0.1:``port``: hypercorn
    with ``hypercorn.toml`` (as the Procfile runs it), or uvicorn as "Serving on uvicorn"
    runs it."""
    if server == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", *UVICORN_OPTIONS, "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers), "service:app",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "hypercorn", "--config", "hypercorn.toml",
        "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "service:app",
    ]  # fmt: skip


@asynccontextmanager
async def web(
    spawn: Any,
    env: dict[str, str],
    workers: int = 1,
    ready_path: str = "/stats",
    server: str = "hypercorn",
) -> AsyncIterator[tuple[int, Child]]:
    """``server`` serving the app as deployed (hypercorn with ``hypercorn.toml``, or uvicorn
    with the README's options), once ``ready_path`` answers 200."""
    port = free_port()
    child = spawn(server_argv(server, port, workers), env)

    async def answers() -> bool:
        assert child.process.poll() is None, child.output()
        try:
            return (await http(port, "GET", ready_path))[0] == 200
        except OSError:
            return False

    await eventually(answers, timeout=20, what=f"{server} to answer")
    yield port, child


async def start_dashboard(spawn: Any, env: dict[str, str]) -> tuple[int, Child]:
    """``python -m consumers dashboard`` on ``env``'s ``DASHBOARD_PORT``, once it answers (with
    a password, a 401 to a request without it)."""
    port = int(env["DASHBOARD_PORT"])
    child = spawn(consumer_argv("dashboard"), env)

    async def answers() -> bool:
        assert child.process.poll() is None, child.output()
        try:
            return (await request(port, "GET", "/"))[0] in (200, 401)
        except OSError:
            return False

    await eventually(answers, what="the dashboard to answer")
    return port, child


async def push_emails(redis: aioredis.Redis, keys: Keys, count: int, start: int = 0) -> list[str]:
    queue = DirectQueue(redis, keys, REGISTRY)
    addresses = [f"user{i}@example.com" for i in range(start, start + count)]
    for address in addresses:
        await queue.push(
            "welcome_email", {"user_id": address, "username": address[:-12], "email": address}
        )
    return addresses
