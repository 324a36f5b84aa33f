"""The web service. ``service:app`` is the ASGI app hypercorn serves.

Settings are read from the environment once, here; a bad value stops start-up with one line.
"""

from __future__ import annotations

import sys

from pipeline.errors import SettingsError
from pipeline.logs import configure_logging
from pipeline.settings import Settings
from service.app import create_app

__all__ = ["app", "create_app"]

try:
    _settings = Settings.from_env()
except SettingsError as exc:
    sys.exit(f"error: {exc}")

configure_logging(_settings.log_level, _settings.log_format)
app = create_app(_settings)
