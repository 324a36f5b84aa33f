"""Building responses: every JSON answer of the app goes through :func:`json_response`."""

from __future__ import annotations

from typing import Any

import orjson
from quart import Response


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response encoded with orjson."""
    return Response(orjson.dumps(body), status=status, mimetype="application/json")
