"""One logging set-up for both processes."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Log to stderr at ``level``. hypercorn keeps its own handlers, so its loggers do not
    also propagate to ours (each line would show twice)."""
    logging.basicConfig(level=level, format=FORMAT)
    for name in ("hypercorn.error", "hypercorn.access"):
        logging.getLogger(name).propagate = False
