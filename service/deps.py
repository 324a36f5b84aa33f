"""What a serving app holds: its plan and settings, keys, Redis client, user store and the resolver
of client addresses."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from quart import Quart, Request, current_app, request

from pipeline.keys import Keys
from pipeline.outage import Outage
from pipeline.plan import Plan
from pipeline.registry import Registry
from pipeline.settings import Settings
from service.clients import Address, ClientResolver, allowed
from service.errors import ApiError
from service.users import UserStore

EXTENSION = "signup"


@dataclass(slots=True)
class Deps:
    """Opened when serving starts (see ``service.app``), closed when it stops."""

    plan: Plan
    settings: Settings
    #: The reactions this app's receivers and stats come from (``REACTIONS``).
    registry: Registry
    keys: Keys
    redis: aioredis.Redis
    users: UserStore
    clients: ClientResolver
    #: ``service.validation.reserved_forms`` of RESERVED_USERNAMES.
    reserved: frozenset[str]
    #: This worker's view of Redis: an outage is logged when it starts and when it ends, with
    #: the count of requests it failed, not once per failed request.
    outage: Outage


def deps() -> Deps:
    """The current app's dependencies."""
    return deps_of(current_app)


def deps_of(app: Quart) -> Deps:
    """``app``'s dependencies (the app itself, not the ``current_app`` proxy: a route on
    the signup path looks each proxy up once)."""
    found: Deps = app.extensions[EXTENSION]
    return found


def request_client(req: Request, current: Deps) -> tuple[Address | None, str]:
    """``req``'s client: its address and label (see :class:`ClientResolver`)."""
    peer = req.scope.get("client")
    headers = req.headers
    return current.clients.resolve(
        peer[0] if peer else None, lambda: headers.getlist("X-Forwarded-For")
    )


def operators_only() -> None:
    """A 404, as for a route that does not exist, unless the client is one ``OPS_ALLOW``
    lets read the operational routes (``/stats``, ``/metrics``)."""
    current = deps()
    if not allowed(request_client(request, current)[0], current.settings.ops_allow):
        raise ApiError(404, "not_found", "no such resource")
