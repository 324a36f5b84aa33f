"""The Quart app class the service runs: Quart's own, with two pieces of its per-request
machinery done for less, through the extension points Quart gives (``request_class`` and
``asgi_http_class``). What a request sees is unchanged.

- **The request's blueprints.** Quart asks a request for its blueprint chain three times a
  request (its before-request, after-request and teardown hooks), and each time the property
  imports a helper and splits the endpoint's name again. Here the chain is worked out once per
  endpoint: about 6 us a signup less.
- **The request's tasks.** Quart handles each request in a task of its own beside the task
  receiving its messages, and waits for the first to end; here the handling runs in the
  task the server gave the request (see :class:`ServiceHTTPConnection`).
- **The request's URL adapter and route.** For each request Quart binds the app's URL map to
  the request's host (its ``Host`` header checked, lowercased, IDNA-encoded: a pure-Python
  codec) and then matches the path against the map. Here both are remembered: the binding per
  host, scheme and root path, the match per host, path and method (a few hundred of each,
  the oldest forgotten first). Whatever raises (a bad host, a 404, a 405, a redirect) is
  never remembered, so it is raised again each time as Quart raises it. A ``Host`` header
  werkzeug will not bind to (not a valid international domain name, such as ``a..b``) makes
  Quart raise ``BadHost`` before its request context exists, where no error handler sees it,
  so the server answered 500; here the request fails to match with it instead, and is
  answered by the app's error handler: a 400 in the API's error body.
- **The request's length.** Quart reads ``Content-Length`` and ``Transfer-Encoding`` when it
  makes the request, through werkzeug's ``Headers``, where a header that is absent (as
  ``Transfer-Encoding`` nearly always is) costs a raised and caught ``KeyError``. Here they
  are read from the ASGI scope's headers, and werkzeug's own function makes the length.
- **The response's time limit.** Quart sends each response under ``asyncio.wait_for`` with
  ``RESPONSE_TIMEOUT``, which runs the send in a task of its own, with a timer. Here the send
  runs in the request's task under ``asyncio.timeout``, the same limit with the same outcome
  (a send still out when it expires is dropped, as Quart drops it): a task and a loop
  iteration less for every request.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from typing import Any, Final, cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from quart import Quart, Response
from quart.asgi import ASGIHTTPConnection, _handle_exception
from quart.wrappers import Request
from quart.wrappers.base import BaseRequestWebsocket
from werkzeug.exceptions import BadHost, HTTPException
from werkzeug.routing import MapAdapter, Rule
from werkzeug.sansio.utils import get_content_length

from service.middleware import scope_header

#: What a request whose Host header cannot be bound is told (with its 400).
_BAD_HOST: Final = "the Host header is not a valid host name"
#: How many bindings and matches each app remembers.
_REMEMBERED: Final = 512


def _remember(memory: dict[Any, Any], key: Any, value: Any) -> None:
    """Put ``value`` in ``memory``, forgetting its oldest entry when it is full."""
    if len(memory) >= _REMEMBERED:
        del memory[next(iter(memory))]
    memory[key] = value


@functools.cache
def _blueprints_of(endpoint: str) -> list[str]:
    """The blueprint chain of ``endpoint`` (``"a.b.view"`` -> ``["a.b", "a"]``), innermost
    first, as Quart's ``Request.blueprints`` gives it. Endpoints are a fixed, small set: the
    app's routes."""
    if "." not in endpoint:
        return []
    chain = [endpoint.rpartition(".")[0]]
    while "." in chain[-1]:
        chain.append(chain[-1].rpartition(".")[0])
    return chain


class ServiceRequest(Request):
    """Quart's request, with its blueprint chain worked out once per endpoint, and its length
    read from the scope."""

    @functools.cached_property
    def content_length(self) -> int | None:
        """As werkzeug's: the first ``Content-Length`` as an int (0 if it is not one), None
        without one or with a chunked ``Transfer-Encoding``."""
        headers = self.scope.get("headers")
        if headers is None:  # a request made by hand, without the scope's headers
            return cast(int | None, Request.content_length.__get__(self))
        return get_content_length(
            scope_header(headers, b"content-length"), scope_header(headers, b"transfer-encoding")
        )

    @property
    def blueprints(self) -> list[str]:
        rule = self.url_rule
        if rule is None or rule.endpoint is None:
            return []
        return _blueprints_of(rule.endpoint)


class ServiceHTTPConnection(ASGIHTTPConnection):
    """Quart's HTTP connection, handling the request in the server's task for it."""

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        """As Quart's: the request's messages are received in a task of their own, and a
        disconnect (or a failure to receive) cancels the handling and ends the request
        quietly; the receiving is cancelled once the response is sent. Quart runs the
        handling in a second task and waits for the first of the two to end; here it runs
        in the task the server gave the request, which saves a task, the wait on both
        and the gathering of the cancelled one, for every request."""
        request = self._create_request_from_scope(send)
        receiver = asyncio.ensure_future(self.handle_messages(request, receive))
        handler = asyncio.current_task()
        assert handler is not None
        handled = False

        def received_all(_: asyncio.Task[None]) -> None:
            if not handled:  # a disconnect, or receive failed: stop handling
                handler.cancel()

        receiver.add_done_callback(received_all)
        try:
            await self.handle_request(request, send)
        except asyncio.CancelledError:
            # Ours (the receiver ended) is swallowed, as Quart ends such a request; one from
            # outside (the server's) goes on.
            if not receiver.done() or handler.uncancel() > 0:
                raise
        finally:
            handled = True
            receiver.remove_done_callback(received_all)
            if not receiver.done():
                receiver.cancel()
        if not receiver.cancelled() and receiver.done():
            failure = receiver.exception()
            if failure is not None:
                raise failure

    async def handle_request(self, request: Request, send: ASGISendCallable) -> None:
        try:
            response = await self.app.handle_request(request)
        except Exception as error:
            response = await _handle_exception(self.app, error)

        if isinstance(response, Response) and response.timeout != Ellipsis:
            timeout = cast(float | None, response.timeout)
        else:
            timeout = self.app.config["RESPONSE_TIMEOUT"]
        try:
            async with asyncio.timeout(timeout):
                await self._send_response(send, response)
        except TimeoutError:
            pass


class _Host:
    """What Quart's ``QuartMap.bind_to_request`` reads of a request, for binding once per
    host: the path, method and query are the request's own, set on each adapter."""

    def __init__(self, request: BaseRequestWebsocket) -> None:
        self.host = request.host
        self.scheme = request.scheme
        self.root_path = request.root_path
        self.method = "GET"
        self.path = "/"
        self.query_string = b""


class ServiceMapAdapter(MapAdapter):
    """werkzeug's URL adapter, whose match of the request it was bound to is remembered by
    its app (see :class:`ServiceQuart`)."""

    matches: dict[Any, tuple[Rule, Mapping[str, Any]]]
    #: Why the request's host cannot be bound: raised by the match (so by Quart, as the
    #: request's routing failure) instead of by the binding.
    refused: HTTPException | None = None

    def match(
        self,
        path_info: str | None = None,
        method: str | None = None,
        return_rule: bool = False,
        query_args: Mapping[str, Any] | str | None = None,
        websocket: bool | None = None,
    ) -> tuple[Any, Mapping[str, Any]]:
        """As werkzeug's. Quart's match of the request (``match(return_rule=True)``) is
        remembered per map, host, subdomain, path, method and kind: a match that did not raise
        depends on nothing else (the query only goes into a redirect, which raises)."""
        if self.refused is not None:
            raise self.refused
        if not return_rule or path_info is not None or method is not None or websocket:
            return super().match(path_info, method, return_rule, query_args, websocket)  # type: ignore[call-overload,no-any-return]
        key = (
            self.map,
            self.server_name,
            self.subdomain,
            self.path_info,
            self.default_method,
            self.websocket,
        )
        found = self.matches.get(key)
        if found is None:
            found = super().match(return_rule=True, query_args=query_args)
            _remember(self.matches, key, found)
        rule, arguments = found
        return rule, dict(arguments)


class ServiceQuart(Quart):
    """The app class of ``service.app.create_app``."""

    request_class = ServiceRequest
    asgi_http_class = ServiceHTTPConnection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bindings: dict[Any, MapAdapter] = {}
        self._matches: dict[Any, tuple[Rule, Mapping[str, Any]]] = {}

    def create_url_adapter(self, request: BaseRequestWebsocket | None) -> MapAdapter | None:
        """As Quart's, with the binding to the request's host, scheme and root path made
        once (by Quart's own ``bind_to_request``) and its match remembered."""
        if request is None:
            return super().create_url_adapter(request)
        subdomain = (
            (self.url_map.default_subdomain or None) if not self.subdomain_matching else None
        )
        server_name = self.config["SERVER_NAME"]
        try:
            key = (request.host, request.scheme, request.root_path, subdomain, server_name)
            bound = self._bindings.get(key)
            if bound is None:
                bound = self.url_map.bind_to_request(_Host(request), subdomain, server_name)  # type: ignore[attr-defined]
                _remember(self._bindings, key, bound)
        except HTTPException as refused:
            if isinstance(refused, BadHost):
                refused = BadHost(_BAD_HOST)
            adapter = ServiceMapAdapter(
                self.url_map, "", "", None, request.scheme, request.path, request.method
            )
            adapter.refused = refused
            return adapter
        adapter = ServiceMapAdapter(
            self.url_map,
            bound.server_name,
            bound.script_name,
            bound.subdomain,
            bound.url_scheme,
            request.path,
            request.method,
            request.query_string.decode(),
        )
        adapter.matches = self._matches
        return adapter
