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
- **The response's time limit.** Quart sends each response under ``asyncio.wait_for`` with
  ``RESPONSE_TIMEOUT``, which runs the send in a task of its own, with a timer. Here the send
  runs in the request's task under ``asyncio.timeout``, the same limit with the same outcome
  (a send still out when it expires is dropped, as Quart drops it): a task and a loop
  iteration less for every request.
"""

from __future__ import annotations

import asyncio
import functools
from typing import cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from quart import Quart, Response
from quart.asgi import ASGIHTTPConnection, _handle_exception
from quart.wrappers import Request


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
    """Quart's request, with its blueprint chain worked out once per endpoint."""

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


class ServiceQuart(Quart):
    """The app class of ``service.app.create_app``."""

    request_class = ServiceRequest
    asgi_http_class = ServiceHTTPConnection
