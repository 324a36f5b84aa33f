"""Redis servers a test starts and stops itself (of the kind this run tests), and raw
commands to them."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.embedded_redis import free_port
from tests.conftest import eventually, suite_server_args


def raw(port: int, *args: str, timeout: float = 5.0) -> bytes:
    """One command over a fresh socket; the first line of the reply (``+PONG``, ``-BUSY …``)."""
    command = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command.encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


def answers(port: int, prefix: bytes) -> bool:
    try:
        return raw(port, "PING", timeout=1).startswith(prefix)
    except OSError:
        return False


@dataclass
class Scratch:
    """A server of this run's kind, on its own port and directory, that a test may restart."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    sockets: list[socket.socket] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, *extra: str, ready: bytes = b"+PONG") -> None:
        self.directory.mkdir(exist_ok=True)
        args = [*suite_server_args(self.port, self.directory), *extra]
        self.process = await asyncio.to_thread(subprocess.Popen, args, stdout=subprocess.DEVNULL)
        await eventually(lambda: answers(self.port, ready), what=f"the server to answer {ready!r}")

    def stop(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:  # a server that cannot save will not stop
                self.process.kill()
                self.process.wait(10)
