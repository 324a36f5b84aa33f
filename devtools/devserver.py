"""``make run``: Redis, then the Procfile's web, worker and dashboard, in the foreground.

Redis is skipped when ``REDIS_URL`` is set (it points at a Redis of yours), and reused when one
already answers on 127.0.0.1:6379. Otherwise a redis-server (see
:mod:`devtools.embedded_redis`) serves on 6379 with its files in ``.run/redis/<kind>-<major>``
(``valkey-9``, ``redis-7``): each kind of server keeps its own files, since a server cannot
read what a newer or different one wrote. A server that does not start is reported with its
own last log lines.

The web binds ``WEB_HOST``, which ``make run`` sets to 127.0.0.1 unless it is set already: a
dev server is reachable from this machine only. (The Procfile's default, for deploys, is
0.0.0.0.) The dashboard binds loopback (its default) and is locked with ``DASHBOARD_PASSWORD``,
or, when that is unset, with a password made for this run and printed with its address.

Children run in their own sessions so Ctrl-C reaches only this supervisor, which then stops
them in order: web and worker with SIGTERM (the worker drains its jobs), then Redis. A second
Ctrl-C is passed on (the worker stops at once). No process is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from devtools.embedded_redis import (
    RedisServerNotFoundError,
    find_redis_server,
    server_args,
    server_version,
    wait_until_ready,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_PORT = 6379
STOP_TIMEOUT = 20.0
#: The address the web binds under ``make run`` unless ``WEB_HOST`` says otherwise.
DEFAULT_WEB_HOST = "127.0.0.1"
#: How many of a child's last output lines are kept, to show when it fails to start.
TAIL_LINES = 15


def _procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() and not name.startswith("#"):
            entries[name.strip()] = command.strip()
    return entries


def _redis_answers(port: int) -> bool:
    try:
        wait_until_ready(port, time.monotonic() + 0.3)
    except (TimeoutError, RuntimeError):
        return False
    return True


def data_dir_for(binary: str, root: Path) -> Path:
    """Where a server of ``binary``'s kind keeps its files under ``root``: ``valkey-9``,
    ``redis-7``. Valkey's files (``VALKEY080``) stop a Redis at start-up, and a newer major's
    an older one, so each kind and major version has its own."""
    try:
        name, _, version = server_version(binary).partition(" ")
    except (OSError, subprocess.SubprocessError) as exc:
        raise RedisServerNotFoundError(f"{binary}: cannot run it ({exc})") from exc
    return root / f"{name.lower()}-{version.split('.')[0]}"


async def _pump(name: str, stream: asyncio.StreamReader, tail: deque[str]) -> None:
    width = 6
    async for line in stream:
        text = line.decode(errors="replace")
        if text.strip():
            tail.append(text.rstrip("\n"))
        sys.stdout.write(f"{name:<{width}}| {text}")
        sys.stdout.flush()


async def _start(
    name: str, argv: list[str], env: dict[str, str], tail: deque[str] | None = None
) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
    """Start ``argv`` with its output shown under ``name`` (and its last lines kept in
    ``tail``); the process and the task showing its output, which ends with the output."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert process.stdout is not None
    kept = deque[str](maxlen=TAIL_LINES) if tail is None else tail
    return process, asyncio.get_running_loop().create_task(_pump(name, process.stdout, kept))


def _signal_group(process: asyncio.subprocess.Process, signum: int) -> bool:
    # Each child leads its own session, so its process group holds everything it started.
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        return False
    return True


async def _stop(process: asyncio.subprocess.Process, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the child's whole group; wait until the group is empty, else SIGKILL it."""
    deadline = time.monotonic() + timeout
    alive = _signal_group(process, signal.SIGTERM)
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        alive = _signal_group(process, 0)
    if alive:
        _signal_group(process, signal.SIGKILL)
    await process.wait()


async def supervise(redis_port: int, data_root: Path) -> int:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("WEB_HOST", DEFAULT_WEB_HOST)
    made = "DASHBOARD_PASSWORD" not in env
    password = env.setdefault("DASHBOARD_PASSWORD", secrets.token_urlsafe(12))
    redis: asyncio.subprocess.Process | None = None
    if env.get("REDIS_URL"):
        print("run   | REDIS_URL is set: using that Redis, starting none")
    elif _redis_answers(redis_port):
        print(f"run   | a Redis already answers on 127.0.0.1:{redis_port}: using it")
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    else:
        binary = find_redis_server()
        data_dir = await asyncio.to_thread(data_dir_for, binary, data_root)
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        args = server_args(redis_port, data_dir, appendonly=True, binary=binary)
        print(f"run   | starting {args[0]} on 127.0.0.1:{redis_port} (data in {data_dir})")
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        tail = deque[str](maxlen=TAIL_LINES)
        redis, output = await _start("redis", args, env, tail)
        deadline = time.monotonic() + 15
        while not await asyncio.to_thread(_redis_answers, redis_port):
            if redis.returncode is not None or time.monotonic() > deadline:
                await _stop(redis)
                await asyncio.wait({output}, timeout=2)  # every line it wrote, shown and kept
                print(
                    f"run: error: {args[0]} did not start (its files are in {data_dir}); "
                    "its last lines:"
                )
                for line in tail or ["(it wrote nothing)"]:
                    print(f"run:   {line}")
                return 1

    children: dict[str, asyncio.subprocess.Process] = {}
    for name, command in _procfile().items():
        # As a Procfile runner does: each line through sh, which each line ends by exec'ing.
        children[name], _ = await _start(name, ["sh", "-c", command], env)
    port, host = env.get("PORT", "8000"), env["WEB_HOST"]
    print(f"run   | web on http://{host}:{port}; Ctrl-C stops everything")
    board = f"http://{env.get('DASHBOARD_BIND', '127.0.0.1')}:{env.get('DASHBOARD_PORT', '9181')}"
    user = env.get("DASHBOARD_USER", "admin")
    shown = f"password {password} (made for this run)" if made else "DASHBOARD_PASSWORD"
    print(f"run   | dashboard on {board}: user {user}, {shown}")

    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()

    def on_signal() -> None:
        if interrupted.is_set():  # second Ctrl-C: pass it on, the worker stops at once
            for child in children.values():
                _signal_group(child, signal.SIGINT)
        interrupted.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)

    waits = {asyncio.create_task(child.wait()): name for name, child in children.items()}
    stopped = asyncio.create_task(interrupted.wait())
    done, _ = await asyncio.wait({*waits, stopped}, return_when=asyncio.FIRST_COMPLETED)
    failed = [waits[task] for task in done if task in waits]
    if failed:
        print(f"run   | {', '.join(failed)} exited; stopping the rest")
    else:
        print("run   | stopping")
    await asyncio.gather(*(_stop(child) for child in children.values()))
    if redis is not None:
        await _stop(redis)
    stopped.cancel()
    codes = {name: child.returncode for name, child in children.items()}
    print(f"run   | stopped ({', '.join(f'{n} exit {c}' for n, c in codes.items())})")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.devserver", description=__doc__)
    parser.add_argument("--redis-port", type=int, default=DEFAULT_REDIS_PORT)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=ROOT / ".run" / "redis",
        help="the server's files go in a directory per kind below it (valkey-9, redis-7)",
    )
    options = parser.parse_args(argv)
    try:
        return asyncio.run(supervise(options.redis_port, options.data_dir))
    except RedisServerNotFoundError as exc:
        print(f"run: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
