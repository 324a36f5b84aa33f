"""The web service. ``service:app`` is the ASGI app hypercorn serves.

Settings are read from the environment once, here; a bad value, or reactions that do not fit
together (see ``pipeline.registry``), stops start-up with one line.
In a hypercorn worker, metrics are kept in prometheus_client's multiprocess mode, in a
directory under ``METRICS_DIR`` shared by the workers of one hypercorn master, so a scrape
served by any worker sums them all. (Imported anywhere else, as by the tests, the process
keeps its metrics to itself.)
"""

from __future__ import annotations

import gc
import signal
import sys

from pipeline.errors import ReactionError, SettingsError
from pipeline.logs import configure_logging
from pipeline.metrics import is_spawned_worker, use_multiprocess_dir
from pipeline.settings import Settings
from service.app import create_app

__all__ = ["app", "create_app"]

#: Allocations (net) between two collections of the young generation (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000

try:
    _settings = Settings.from_env()
except SettingsError as exc:
    sys.exit(f"error: {exc}")

configure_logging(_settings.log_level, _settings.log_format)
if is_spawned_worker():
    # hypercorn's master alone decides when its workers stop (it tells them through an
    # event, and they drain their requests in flight). Its SIGTERM to the workers still
    # draining once the first has stopped (hypercorn 0.18), or a SIGTERM sent to every
    # process of the group (Heroku, systemd), would otherwise cut those requests off. With
    # ``daemon = false`` (hypercorn.toml) the master waits for them before exiting.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        use_multiprocess_dir(_settings.metrics_dir)
    except OSError as exc:
        sys.exit(f"error: METRICS_DIR={_settings.metrics_dir!r}: {exc.strerror or exc}")
try:
    app = create_app(_settings)
except ReactionError as exc:
    sys.exit(f"error: REACTIONS: {exc}")


@app.before_serving
async def _freeze_the_heap() -> None:
    """Once the worker has loaded everything it keeps (modules, the app, its Redis pool),
    move it out of the garbage collector's sight, and collect the young generation less
    often. A collection then scans only what requests allocate, not the whole heap: about
    40 us of CPU less per signup (in-process, 32 at a time), and no full-heap pauses in the
    latency tail. Only the served app does this; apps the tests build collect as usual."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
