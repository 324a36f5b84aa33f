"""Redis servers a test starts and stops itself (of the kind this run tests), and raw
commands to them."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from devtools.embedded_redis import free_port
from tests.helpers import REDIS_BINARY, eventually, suite_server_args


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
        self.directory.mkdir(parents=True, exist_ok=True)
        await self.launch([*suite_server_args(self.port, self.directory)[1:], *extra], ready)

    async def launch(self, args: list[str], ready: bytes = b"+PONG") -> None:
        """Start the run's server binary with ``args`` (a sentinel's config file, say)."""
        argv = [REDIS_BINARY, *args]
        # Its output is kept, so a server that never answers says why (a port taken, say).
        output = self.directory / "server.out"
        with output.open("ab") as sink:
            self.process = await asyncio.to_thread(subprocess.Popen, argv, stdout=sink)
        try:
            await eventually(
                lambda: answers(self.port, ready) or self.process.poll() is not None,
                what=f"the server to answer {ready!r}",
            )
            if self.process.poll() is not None:
                raise AssertionError(f"the server on port {self.port} exited")
        except BaseException as exc:
            self.stop()  # a server that never became ready is not left running
            tail = output.read_text(errors="replace").splitlines()[-15:]
            exc.add_note(f"{' '.join(argv)}\n" + "\n".join(tail))
            raise

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


#: The sentinels' name for the primary, as in ``redis+sentinel://…/signup/0``.
SERVICE = "signup"


@dataclass
class Topology:
    """A primary, two replicas (so a promoted replica still has one) and three sentinels
    (quorum 2, ``down-after-milliseconds`` 1000), all on loopback."""

    root: Path
    servers: list[Scratch] = field(default_factory=list)
    sentinels: list[Scratch] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    async def start(self) -> None:
        primary = Scratch(self.root / "server-0")
        await primary.start()
        self.servers = [primary]
        for n in (1, 2):
            replica = Scratch(self.root / f"server-{n}")
            await replica.start("--replicaof", "127.0.0.1", str(primary.port))
            self.servers.append(replica)
        for n in range(3):
            sentinel = Scratch(self.root / f"sentinel-{n}")
            sentinel.directory.mkdir(parents=True, exist_ok=True)
            config = sentinel.directory / "sentinel.conf"
            config.write_text(
                f"port {sentinel.port}\nbind 127.0.0.1\ndir {sentinel.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 4000\n"
                f"sentinel parallel-syncs {SERVICE} 2\n"
                f"logfile {sentinel.directory / 'sentinel.log'}\n"
            )
            await sentinel.launch([str(config), "--sentinel"])
            self.sentinels.append(sentinel)

        def settled() -> bool:
            return all(
                self.sentinel_view(s, "num-slaves") == "2"
                and self.sentinel_view(s, "num-other-sentinels") == "2"
                for s in self.sentinels
            )

        await eventually(settled, timeout=30, what="the sentinels to see the whole topology")

    def sentinel_view(self, sentinel: Scratch, field_name: str) -> str | None:
        """One field of what ``sentinel`` knows of the primary (SENTINEL MASTER)."""
        try:
            reply = raw_all(sentinel.port, "SENTINEL", "MASTER", SERVICE)
        except OSError:
            return None
        pairs = dict(zip(reply[::2], reply[1::2], strict=True))
        return pairs.get(field_name)

    def primary(self) -> Scratch:
        """The server the sentinels name as the primary now."""
        for sentinel in self.sentinels:
            try:
                _, port = raw_all(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            except (OSError, ValueError):
                continue
            return next(s for s in self.servers if s.port == int(port))
        raise AssertionError("no sentinel names a primary")

    def sentinel_logs(self, lines: int = 40) -> str:
        """The last ``lines`` of each sentinel's log: what it saw of a failover that did not
        come, for the message of a test that timed out waiting for one."""
        tails = []
        for sentinel in self.sentinels:
            log = sentinel.directory / "sentinel.log"
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            tails.append(f"--- sentinel {sentinel.port}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(tails)

    def stop(self) -> None:
        for process in (*self.sentinels, *self.servers):
            process.stop()


def raw_all(port: int, *args: str, timeout: float = 5.0) -> list[str]:
    """One command over a fresh socket; a reply that is an array of bulk strings (or a
    single one), as text. An error reply raises ValueError."""
    command = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command.encode())
        data = b""
        items: list[str] | None = None
        while items is None:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("connection closed")
            data += chunk
            items = _parse_strings(data)
    return items


def _parse_strings(data: bytes) -> list[str] | None:
    """A RESP array of bulk strings (or one bulk string / simple reply), or None if more
    bytes are needed."""
    lines = data.split(b"\r\n")
    if not lines or not lines[0]:
        return None
    head = lines[0]
    if head.startswith(b"-"):
        raise ValueError(head.decode())
    if head.startswith((b"+", b":")):
        return [head[1:].decode()]
    if head.startswith(b"$"):
        size, start = int(head[1:]), len(head) + 2
        return [data[start : start + size].decode()] if len(data) >= start + size + 2 else None
    count, index = int(head[1:]), 1
    items: list[str] = []
    while len(items) < count:
        if index + 1 >= len(lines):
            return None
        items.append(lines[index + 1].decode())
        index += 2
    return items
