"""prometheus_client's multiprocess mode for the web's workers: each hypercorn (or uvicorn)
worker keeps its counters in memory-mapped files in one directory per master, so a scrape
served by any worker sums them all. ``service`` turns it on in a spawned worker."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
from pathlib import Path

from prometheus_client import values


def is_spawned_worker() -> bool:
    """Whether multiprocessing started this process (as hypercorn starts its workers)."""
    return multiprocessing.parent_process() is not None


def use_multiprocess_dir(base: str) -> str:
    """Switch prometheus_client to multiprocess mode in a directory shared by the workers of
    this process's hypercorn master, and return it. Call before creating any metric.

    The directory is named for the master's pid and start time, so a restarted server starts
    from zero rather than adding to a previous run's counts; directories left by masters that
    are gone are removed. (Counts of a worker that died stay in the sum, as they should.)"""
    owner = _master_identity()
    root = Path(base)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("web-*"):
        if stale.name != f"web-{owner}" and not _alive(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    directory = root / f"web-{owner}"
    directory.mkdir(exist_ok=True)
    # prometheus_client reads the directory from the environment when it opens its files.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue(  # type: ignore[no-untyped-call]
        process_identifier=_pid
    )
    return str(directory)


#: This process's id, asked of the system once (and again in a forked child), not at every
#: increment: prometheus_client checks it at each one to notice a fork, and a request makes
#: four (``os.getpid`` is a system call, 0.26 us here).
_this_pid = os.getpid()


def _pid() -> int:
    return _this_pid


def _forked() -> None:
    global _this_pid
    _this_pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _master_identity() -> str:
    """``<pid>-<start time>`` of hypercorn's master (our parent) when hypercorn spawned us as
    a worker, else of this process."""
    pid = os.getppid() if is_spawned_worker() else os.getpid()
    return f"{pid}-{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "0"
    # Field 22, after the parenthesised command name (which may itself hold spaces).
    return stat.rpartition(")")[2].split()[19]


def _alive(name: str) -> bool:
    pid_text, _, started = name.removeprefix("web-").partition("-")
    with contextlib.suppress(ValueError):
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return _start_time(pid) == started
    return False
