"""``python -m consumers dashboard``: the dashboard served by hypercorn in this process until
SIGTERM or SIGINT. Without ``DASHBOARD_PASSWORD`` it starts only on a loopback address, and
says loudly that it is open."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config

from dashboard.app import create_dashboard
from pipeline.plan import Plan

logger = logging.getLogger("dashboard")
PROG = "python -m consumers dashboard"


async def serve_dashboard(plan: Plan) -> int:
    """Serve until told to stop; the process's exit code."""
    settings = plan.settings
    host, port = settings.dashboard_bind, settings.dashboard_port
    if settings.dashboard_password is None and not settings.dashboard_on_loopback:
        print(
            f"{PROG}: error: DASHBOARD_PASSWORD is not set, so the dashboard may listen on a "
            f"loopback address only (DASHBOARD_BIND={host!r})",
            file=sys.stderr,
        )
        return 2
    shown = f"[{host}]" if ":" in host else host
    config = Config()
    config.bind = [f"{shown}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("dashboard.server")
    config.graceful_timeout = 2.0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if settings.dashboard_password is None:
        logger.warning(
            "the dashboard is OPEN (no DASHBOARD_PASSWORD): anyone who can reach "
            "http://%s:%d/ can see the pipeline and act on it",
            shown,
            port,
        )
    else:
        logger.info(
            "dashboard on http://%s:%d/ (user %r, DASHBOARD_PASSWORD)",
            shown,
            port,
            settings.dashboard_user,
        )
    try:
        await serve(create_dashboard(plan), config, shutdown_trigger=stop.wait)
    except OSError as exc:
        print(
            f"{PROG}: error: cannot listen on {shown}:{port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    logger.info("dashboard stopped")
    return 0
