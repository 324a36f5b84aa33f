"""The app factory: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import logging

import redis.exceptions as redis_errors
from quart import Quart, Response, current_app
from werkzeug.exceptions import HTTPException

from pipeline import tracing
from pipeline.connections import REDIS_UNAVAILABLE, web_client
from pipeline.heap import freeze_heap
from pipeline.keys import Keys
from pipeline.outage import Outage
from pipeline.plan import Plan
from service.clients import ClientResolver
from service.deps import EXTENSION, Deps
from service.errors import ApiError, UnavailableError
from service.framework import ServiceQuart
from service.health import health
from service.metrics import EXTENSION as METRICS
from service.metrics import WebMetrics, metrics_api
from service.middleware import RequestObserver
from service.openapi import document_api
from service.responses import json_response
from service.routes import api
from service.users import UserStore
from service.validation import reserved_forms

logger = logging.getLogger(__name__)

_HTTP_MESSAGES = {
    404: "no such resource",
    405: "that method is not allowed here",
    408: "the request body did not arrive in time",
    413: "the body is too large",
}
#: Answers given before the body was all read (RFC 9110 15.5.9: a 408 closes).
_BODY_LEFT_UNREAD = frozenset({408, 413})


def create_app(plan: Plan) -> Quart:
    """Build the web app of ``plan`` (see :func:`pipeline.plan.resolve`). Redis is opened
    when serving starts and closed when it stops.

    The plan's reactions connect their receivers for this app; a receiver of their signals
    that no reaction declares, or one that may push an undeclared job type, raises
    :class:`ReactionError` here: the app does not start."""
    settings, registry = plan.settings, plan.registry
    app = ServiceQuart(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # A body that has not all arrived this long after the handler asked for it is a 408: a
    # client trickling its body (slowloris) holds a connection, never a worker, and not for long.
    app.config["BODY_TIMEOUT"] = settings.body_timeout
    app.register_blueprint(api)
    app.register_blueprint(health)
    app.register_blueprint(metrics_api)
    metrics = app.extensions[METRICS] = WebMetrics()
    document_api(app, registry)
    registry.connect(app)
    registry.check_receivers(app)

    @app.before_serving
    async def open_redis() -> None:
        client = web_client(settings)
        keys = Keys(settings.key_prefix)
        outage = Outage(
            logger,
            "answering 503 until it is back (this worker logs the outage's end, not each request)",
            resuming="serving",
            counted="requests failed",
        )
        users = UserStore(
            client,
            keys,
            settings.rate_limit,
            settings.rate_limit_failure,
            min_replicas=settings.redis_min_replicas,
            replica_timeout=settings.redis_replica_timeout,
            idempotency_key_ttl=settings.idempotency_key_ttl,
            outage=outage,
        )
        clients = ClientResolver(settings.trusted_proxies)
        reserved = reserved_forms(settings.reserved_usernames)
        app.extensions[EXTENSION] = Deps(
            plan, settings, registry, keys, client, users, clients, reserved, outage
        )

    @app.after_serving
    async def close_redis() -> None:
        current: Deps | None = app.extensions.pop(EXTENSION, None)
        if current is not None:
            await current.redis.aclose()
        # Tracing on: the spans still batched go out (the exporter blocks, so off the loop).
        if tracing.tracer is not None:
            await asyncio.to_thread(tracing.shutdown)

    app.register_error_handler(ApiError, _render_api_error)
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(redis_errors.RedisError, _render_redis_error)
    app.register_error_handler(Exception, _render_unexpected)
    app.asgi_app = RequestObserver(  # type: ignore[method-assign]
        app, app.asgi_app, access_log=settings.access_log, observe=metrics.observe
    )
    return app


async def _render_api_error(error: ApiError) -> Response:
    response = json_response(error.body(), error.status)
    response.headers.update(error.headers)
    return response


async def _render_http_error(error: HTTPException) -> Response:
    status = error.code or 500
    code = (error.name or "error").lower().replace(" ", "_")
    message = _HTTP_MESSAGES.get(status, error.description or error.name or "error")
    response = json_response({"error": code, "message": message}, status)
    allow = dict(error.get_headers()).get("Allow")
    if allow:
        response.headers["Allow"] = allow
    if status in _BODY_LEFT_UNREAD:
        # The rest of the body was never read: the connection cannot carry another request.
        # hypercorn closes it by itself; uvicorn waits for the body unless told.
        response.headers["Connection"] = "close"
    return response


async def _render_redis_error(error: redis_errors.RedisError) -> Response:
    if isinstance(error, REDIS_UNAVAILABLE):
        current: Deps | None = current_app.extensions.get(EXTENSION)
        if current is not None:
            current.outage.failed(error)
        return await _render_api_error(UnavailableError())
    return await _render_unexpected(error)


async def _render_unexpected(error: Exception) -> Response:
    logger.error("unexpected error", exc_info=error)
    return json_response({"error": "internal", "message": "an unexpected error happened"}, 500)


async def freeze_heap_on_start() -> None:
    """A serving hook: :func:`freeze_heap` once the worker has loaded everything it keeps
    (modules, the app, its Redis pool). ``service:app`` (what hypercorn serves) has it;
    apps the tests build collect as usual."""
    freeze_heap()
