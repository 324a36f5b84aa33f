"""Health checks for load balancers and orchestrators: ``GET /healthz`` and ``GET /readyz``."""

from __future__ import annotations

import asyncio

from quart import Blueprint, Response
from redis.exceptions import RedisError

from service.deps import deps
from service.openapi import Live, NotReady, Ready, responses
from service.responses import json_response

health = Blueprint("health", __name__)

#: How long ``/readyz`` waits for Redis to answer PING.
READY_TIMEOUT = 1.0


@health.get("/healthz")
@responses((200, Live))
async def healthz() -> Response:
    """Liveness: the process answers. No Redis call, so a Redis outage never restarts us."""
    return json_response({"status": "ok"})


@health.get("/readyz")
@responses((200, Ready), (503, NotReady))
async def readyz() -> Response:
    """Readiness: 200 when Redis answers PING within a second, else 503 with the reason."""
    current = deps()
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await current.redis.ping()
    except TimeoutError:
        reason = f"Redis did not answer PING within {READY_TIMEOUT:g} s"
        current.outage.failed(TimeoutError(reason))
    except RedisError as exc:
        reason = f"Redis did not answer PING: {exc}"
        current.outage.failed(exc)
    else:
        current.outage.ok()
        return json_response({"status": "ready"})
    return json_response({"error": "not_ready", "message": reason}, 503)
