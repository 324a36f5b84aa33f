"""uvicorn's command-line options for this service, in a module that imports nothing: what
runs or measures uvicorn (the bench, the tests) gets them without importing uvicorn."""

from __future__ import annotations

from typing import Final

#: uvicorn's options for this service, as the docs' "Serving on uvicorn" gives them (with
#: ``--host``, ``--port`` and ``--workers``): the bounded protocol of
#: ``service.uvicorn_http``, uvloop, the app's access line
#: instead of uvicorn's, no ``server`` header, and hypercorn.toml's keep-alive (75 s),
#: graceful timeout (20 s) and backlog (1024).
UVICORN_OPTIONS: Final = (
    "--http", "service.uvicorn_http:HttpToolsProtocol", "--loop", "uvloop",
    "--no-access-log", "--no-server-header", "--timeout-keep-alive", "75",
    "--timeout-graceful-shutdown", "20", "--backlog", "1024",
)  # fmt: skip
