"""The HTTP API: POST /signup, GET /users/<id>, GET /stats."""

from __future__ import annotations

import asyncio
import time

from quart import Blueprint, Quart, Request, Response, current_app, request
from quart_schema import document_request, operation_id
from werkzeug import exceptions as http_errors

from pipeline.jobs import new_id
from pipeline.signals import emit, user_signed_up
from pipeline.stats import read_stats
from service.deps import deps, deps_of, operators_only, request_client
from service.errors import ApiError
from service.metrics import web_metrics
from service.middleware import scope_header
from service.openapi import (
    Conflict,
    Invalid,
    MalformedBody,
    NotFound,
    RateLimited,
    RequestTimeout,
    SignupCreated,
    SignupRequest,
    Stats,
    TooLarge,
    Unavailable,
    UnsupportedMediaType,
    User,
    responses,
)
from service.responses import json_response
from service.users import NewUser, SignupJobs
from service.validation import parse_body, parse_idempotency_key, validate_signup

api = Blueprint("api", __name__)


@api.post("/signup")
@operation_id("signup")
@document_request(SignupRequest)
@responses(
    (201, SignupCreated),
    (400, MalformedBody),
    (408, RequestTimeout),
    (409, Conflict),
    (413, TooLarge),
    (415, UnsupportedMediaType),
    (422, Invalid),
    (429, RateLimited),
    (503, Unavailable),
)
async def signup() -> Response:
    """Sign a user up.

    Creates the user and emits ``user-signed-up``; the receivers queue its follow-up jobs,
    which are written with the user in one step, or not at all.
    """
    # The request and the app looked up once each (every look through Quart's context
    # proxies costs about a microsecond).
    req: Request = request._get_current_object()  # type: ignore[attr-defined]
    app: Quart = current_app._get_current_object()  # type: ignore[attr-defined]
    current = deps_of(app)
    address = request_client(req, current)[1]
    current.users.admit(address)  # before reading the body
    idempotency_key = parse_idempotency_key(scope_header(req.scope["headers"], _IDEMPOTENCY_KEY))
    body = await _read_body(req)
    fields = validate_signup(
        parse_body(req.mimetype, req.mimetype_params.get("charset"), body), current.reserved
    )
    user = NewUser(
        user_id=new_id(),
        username=fields.username,
        email=fields.email,
        created_at=time.time(),
        username_claim=fields.username_claim,
        email_claim=fields.email_claim,
    )
    jobs = SignupJobs(current.registry)
    failures = await emit(
        user_signed_up,
        app,
        jobs=jobs,
        user_id=user.user_id,
        username=user.username,
        email=user.email,
        created_at=user.created_at,
    )
    if failures:
        counter = web_metrics().receiver_errors
        for name in failures:
            counter.labels(name).inc()
    created = await current.users.create(
        user, jobs, receiver_errors=len(failures), client=address, idempotency_key=idempotency_key
    )
    current.outage.ok()
    return Response(created, status=201, mimetype="application/json")


#: The header's name as the ASGI scope has it (lowercase).
_IDEMPOTENCY_KEY = b"idempotency-key"


async def _read_body(req: Request) -> bytes:
    """The request's whole body, as ``request.get_data(cache=False)`` gives it, with the same
    408 when it has not all arrived within BODY_TIMEOUT, under ``asyncio.timeout`` rather
    than Quart's ``asyncio.wait_for``: that wraps the wait in a task of its own, a few
    microseconds and a loop iteration for every signup. Most bodies are all in before the
    handler asks (a signup's fits in the packet of its headers): those are taken without
    arming and cancelling a timer at all. The task that moves the body in (Quart's receiver)
    was scheduled as the request began, but has usually not run yet when the view asks: one
    turn of the loop lets it, which costs a third of the timer and the wait (3 us against 8)."""
    body = req.body
    complete = getattr(body, "_complete", None)  # Quart's own flag; if it goes, the timer stays
    if isinstance(complete, asyncio.Event) and not complete.is_set():
        await asyncio.sleep(0)
    if isinstance(complete, asyncio.Event) and complete.is_set():
        data: bytes = await body  # raises what the body holds (413) as the wait would
    else:
        try:
            async with asyncio.timeout(req.body_timeout):
                data = await body
        except TimeoutError as exc:
            raise http_errors.RequestTimeout() from exc
    body.clear()
    return data


@api.get("/users/<user_id>")
@operation_id("user")
@responses((200, User), (404, NotFound), (503, Unavailable))
async def get_user(user_id: str) -> Response:
    """A user with what the reactions keep for it, such as its profile (null until
    generated)."""
    current = deps()
    found = await current.users.get(user_id, current.registry.user_fields)
    current.outage.ok()
    if found is None:
        raise ApiError(404, "not_found", "no user has that id")
    return json_response(found)


@api.get("/stats")
@operation_id("stats")
@responses((200, Stats), (404, NotFound), (503, Unavailable))
async def stats() -> Response:
    """Counters, queue depths, jobs held and waiting to be retried, dead letters, the number
    of live consumers, and recent queue-wait and run-time percentiles per queue. For clients
    `OPS_ALLOW` lets in (by default this host and private networks); others get a 404."""
    operators_only()
    current = deps()
    found = await read_stats(current.redis, current.keys, current.registry)
    current.outage.ok()
    # Consumers' hosts and pids are for operators (``python -m consumers stats``), not the API.
    return json_response(found.to_json(consumers="count"))
