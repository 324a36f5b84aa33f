"""The web service. ``service:app`` is the ASGI app hypercorn (or uvicorn) serves.

Settings are read from the environment once, here, and resolved with the reactions they name
(see ``pipeline.plan``); a bad value, or reactions that do not fit together, stops start-up
with one line.
In a worker of a hypercorn (or uvicorn) master, metrics are kept in prometheus_client's
multiprocess mode, in a directory under ``METRICS_DIR`` shared by the workers of one master,
so a scrape served by any worker sums them all. (Imported anywhere else, as by the tests, the
process keeps its metrics to itself.)
"""

from __future__ import annotations

import signal
import sys

from pipeline import tracing
from pipeline.errors import ReactionError, SettingsError
from pipeline.logs import configure_logging
from pipeline.plan import resolve
from pipeline.settings import Settings
from service.app import create_app, freeze_heap_on_start
from service.multiprocess import is_spawned_worker, use_multiprocess_dir

__all__ = ["app", "create_app"]


try:
    _settings = Settings.from_env()
    _plan = resolve(_settings)
except SettingsError as exc:
    sys.exit(f"error: {exc}")

configure_logging(_settings.log_level, _settings.log_format)
# With OTEL_EXPORTER_OTLP_ENDPOINT set (and the tracing extra installed), each worker exports
# its spans (docs/tracing.md).
tracing.configure("signup-web")
if is_spawned_worker():
    if "uvicorn" not in sys.modules:  # a worker of hypercorn's master, not uvicorn's
        # hypercorn's master alone decides when its workers stop (it tells them through an
        # event, and they drain their requests in flight). Its SIGTERM to the workers still
        # draining once the first has stopped (hypercorn 0.18), or a SIGTERM sent to every
        # process of the group (Heroku, systemd), would otherwise cut those requests off.
        # With ``daemon = false`` (hypercorn.toml) the master waits for them before exiting.
        # (uvicorn's workers drain on SIGTERM themselves, and their master waits for them.)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        use_multiprocess_dir(_settings.metrics_dir)
    except OSError as exc:
        sys.exit(f"error: METRICS_DIR={_settings.metrics_dir!r}: {exc.strerror or exc}")
try:
    app = create_app(_plan)
except ReactionError as exc:
    sys.exit(f"error: REACTIONS: {exc}")


app.before_serving(freeze_heap_on_start)
