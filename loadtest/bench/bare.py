"""The ceiling: a bare Quart app answering every ``POST /signup`` with a constant 201.

``hypercorn loadtest.bench.bare:app --worker-class uvloop --workers 2``
"""

from __future__ import annotations

from quart import Quart, Response

app = Quart(__name__)
_BODY = b'{"user_id":"0","username":"bare","email":"bare@example.com"}'


@app.post("/signup")
async def signup() -> Response:
    return Response(_BODY, status=201, content_type="application/json")
