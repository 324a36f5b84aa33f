"""The ASGI middleware around the app: a request id for every request, one access log line,
the HTTP metrics, and with tracing on the request's server span. The access lines of the
requests that end in one loop turn are logged together at its end (see AccessLines).

It wraps ``app.asgi_app`` rather than using Quart's request hooks so that the time measured
and the status seen are the client's: from the first byte handed to the app to the last one
sent, error handlers included.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from quart import Quart

from pipeline import logs, tracing
from pipeline.jobs import new_id

logger = logging.getLogger("service.access")

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Any]
#: What an incoming ``X-Request-ID`` may be; anything else is replaced by a generated id, so
#: a client cannot put line breaks or escapes into our logs through it.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_HEADER = b"x-request-id"
UNMATCHED = "<unmatched>"


def scope_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of the header ``name`` in an ASGI scope's ``headers`` (names there
    are lowercase), decoded as Quart decodes it (latin-1); None without one. Cheaper than
    werkzeug's lookup, which raises and catches an exception for a header not sent."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` when it is a sensible id, else a new one (32 hex
    digits, as job and user ids are made)."""
    text = scope_header(headers, _HEADER)
    if text is not None and _REQUEST_ID_RE.fullmatch(text):
        return text
    return new_id()


class Routes:
    """Maps a path to the route rule that serves it (``/users/<user_id>``), the label that
    keeps metrics' cardinality bounded. Built from the app's URL map on first use."""

    def __init__(self, app: Quart) -> None:
        self._app = app
        self._static: dict[str, str] | None = None
        self._prefixes: list[tuple[str, str]] = []

    def __call__(self, path: str) -> str:
        if self._static is None:
            self._build()
        assert self._static is not None
        found = self._static.get(path)
        if found is not None:
            return found
        for prefix, rule in self._prefixes:
            if path.startswith(prefix) and "/" not in path[len(prefix) :]:
                return rule
        return UNMATCHED

    def _build(self) -> None:
        static: dict[str, str] = {}
        for rule in self._app.url_map.iter_rules():
            text = rule.rule
            if "<" in text:
                self._prefixes.append((text[: text.index("<")], text))
            else:
                static[text] = text
        self._static = static


class AccessLine(NamedTuple):
    """One request's access line: its request id, the client's address, the method, the raw
    target, the status and the seconds it took."""

    request_id: str
    client: str
    method: str
    path: str
    status: int
    seconds: float

    def log(self) -> None:
        logger.info(
            '%s "%s %s" %d %.1f ms',
            self.client,
            self.method,
            self.path,
            self.status,
            self.seconds * 1000,
            extra={"method": self.method, "path": self.path, "status": self.status,
                   "duration_ms": round(self.seconds * 1000, 3)},
        )  # fmt: skip


class AccessLines:
    """The access lines of the requests that end in one turn of the event loop, logged
    together when it ends, each under its own request id, in the order the requests ended.
    Logged one by one between each request's other work, a line cost about twice what it
    costs logged together with the turn's others (about 9 us a signup more, measured with
    ``loadtest.bench.parts``): the logging code then runs warm. So a line's record is made
    (and timed) up to one loop turn after its response went out."""

    def __init__(self) -> None:
        self._waiting: list[AccessLine] = []

    def add(self, line: AccessLine) -> None:
        if not self._waiting:
            asyncio.get_running_loop().call_soon(self.flush)
        self._waiting.append(line)

    def flush(self) -> None:
        """Log the lines waiting (the end of the turn, or the app's shutdown)."""
        lines, self._waiting = self._waiting, []
        for line in lines:
            token = logs.request_id.set(line.request_id)
            try:
                line.log()
            finally:
                logs.request_id.reset(token)


Observer = Callable[[str, str, int, float], None]


class RequestObserver:
    """Gives each HTTP request its id (``X-Request-ID``, echoed in the response), logs one
    access line and hands (method, route, status, seconds) to ``observe``. With tracing on,
    the request is a server span named ``METHOD route`` (``POST /signup``), under the
    client's ``traceparent`` if it sent one."""

    def __init__(
        self, app: Quart, asgi_app: ASGIApp, *, access_log: bool, observe: Observer | None = None
    ) -> None:
        self._asgi_app = asgi_app
        self._routes = Routes(app)
        self._access_log = access_log
        self._observe = observe
        #: The access lines waiting for the end of this loop turn.
        self._access_lines = AccessLines()

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self._asgi_app(scope, receive, send)
            if scope["type"] == "lifespan":  # the app has shut down: what waits goes out
                self._access_lines.flush()
            return
        rid = request_id_of(scope["headers"])  # type: ignore[arg-type]
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        status = 500
        span = None if tracing.tracer is None else self._server_span(scope, rid)
        error: BaseException | None = None

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (_HEADER, rid.encode())]
            await send(message)

        try:
            await self._asgi_app(scope, receive, send_with_id)
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = time.perf_counter() - started
            method, path = scope["method"], scope["path"]
            if self._observe is not None:
                self._observe(method, self._routes(path), status, seconds)
            # The raw target, still percent-encoded: it cannot hold a line break.
            path = scope["raw_path"].decode("latin-1")
            if scope["query_string"]:
                path += "?" + scope["query_string"].decode("latin-1")
            if self._access_log and logger.isEnabledFor(logging.INFO):
                client = scope.get("client")
                line = AccessLine(rid, client[0] if client else "-", method, path, status, seconds)
                if span is None:
                    self._access_lines.add(line)
                else:  # inside the span, whose ids the line carries
                    line.log()
            if span is not None:
                tracing.end_server_span(span, status, error)
            logs.request_id.reset(token)

    def _server_span(self, scope: HTTPScope, rid: str) -> Any:
        method, route = scope["method"], self._routes(scope["path"])
        client = scope.get("client")
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "http.route": route,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
            "http.request.header.x-request-id": (rid,),
        }
        if client:
            attributes["client.address"] = client[0]
        return tracing.server_span(f"{method} {route}", list(scope["headers"]), attributes)
