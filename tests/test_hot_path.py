"""What the signup path does for less than the parts it stands in for, checked against them:
the request's blueprint chain, URL adapter, route match and length, and the response's time
limit (``service.framework``), ids
from a buffer of random bytes, the worker's pid remembered for the metrics."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator

import pytest
from quart import Blueprint, Quart, Response, request
from quart.wrappers import Request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import BadHost

from pipeline.jobs import is_id, new_id
from service import multiprocess
from service.framework import ServiceQuart


def _nested_app(app: Quart, ran: list[str]) -> Quart:
    """Routes at the top and in a blueprint within a blueprint, each answering its chain
    as this app's request gives it and as Quart's own property does; each blueprint's
    before-request hook notes its name in ``ran``."""
    outer, inner = Blueprint("outer", __name__), Blueprint("inner", __name__)

    def chains() -> dict[str, list[str]]:
        quarts = Request.blueprints.fget(request)  # type: ignore[attr-defined]
        return {"blueprints": request.blueprints, "quart": quarts}

    @inner.get("/deep")
    async def deep() -> dict[str, list[str]]:
        return chains()

    @app.get("/top")
    async def top() -> dict[str, list[str]]:
        return chains()

    outer.before_request(lambda: ran.append("outer"))
    inner.before_request(lambda: ran.append("outer.inner"))
    outer.register_blueprint(inner, url_prefix="/inner")
    app.register_blueprint(outer, url_prefix="/outer")
    return app


@pytest.mark.parametrize("path", ["/outer/inner/deep", "/top"])
async def test_the_blueprint_chain_is_quarts(path: str) -> None:
    """Worked out once per endpoint, the chain is the one Quart's own property gives, and
    the nested blueprints' hooks run as they do under Quart."""
    ran: list[str] = []
    app = _nested_app(ServiceQuart(__name__), ran)
    response = await app.test_client().get(path)
    body = await response.get_json()
    assert body["blueprints"] == body["quart"]
    if path == "/top":
        assert body["blueprints"] == [] and ran == []
    else:
        assert body["blueprints"] == ["outer.inner", "outer"]
        assert ran == ["outer", "outer.inner"]


async def test_an_unmatched_request_has_no_blueprints() -> None:
    app = ServiceQuart(__name__)
    seen: list[list[str]] = []

    @app.errorhandler(404)
    async def missing(_: Exception) -> tuple[str, int]:
        seen.append(request.blueprints)
        return "", 404

    assert (await app.test_client().get("/nowhere")).status_code == 404
    assert seen == [[]]


def _routed_app(app: Quart) -> Quart:
    """Routes that answer what the request matched (rule, arguments, length), a route with a
    trailing slash (a request without it is redirected), and one with an int argument."""

    def matched() -> dict[str, object]:
        args = dict(request.view_args or {})
        request.view_args["seen"] = True  # type: ignore[index]  # the next match is not changed
        return {"rule": str(request.url_rule), "args": args, "length": request.content_length}

    @app.route("/things/<int:n>", methods=["GET", "POST"])
    async def thing(n: int) -> dict[str, object]:
        return matched()

    @app.get("/folder/")
    async def folder() -> dict[str, object]:
        return matched()

    @app.post("/signup")
    async def signup() -> dict[str, object]:
        return matched()

    return app


#: Requests whose answers (status, Location, body) the two apps must agree on, each sent
#: twice: the second is answered from what the first left remembered.
_REQUESTS: list[tuple[str, str, dict[str, str] | Headers]] = [
    ("GET", "/things/7", {}),
    ("POST", "/things/8?x=1", {"Content-Length": "3"}),
    ("GET", "/things/seven", {}),
    ("DELETE", "/things/7", {}),
    ("GET", "/folder", {}),
    ("GET", "/folder?q=1", {}),
    ("GET", "/folder/", {"Host": "Example.COM:80"}),
    ("GET", "/folder/", {"Host": "other.example:8080"}),
    ("POST", "/signup", {"Content-Length": "12"}),
    ("POST", "/signup", {"Content-Length": "twelve"}),
    ("POST", "/signup", {"Content-Length": "-4"}),
    ("POST", "/signup", {"Transfer-Encoding": "gzip, chunked", "Content-Length": "12"}),
    ("POST", "/signup", {"Transfer-Encoding": "gzip"}),
    ("POST", "/signup", {}),
    ("POST", "/signup", Headers([("Content-Length", "3"), ("Content-Length", "5")])),
    ("GET", "/nowhere", {}),
]


async def _answers(app: Quart) -> list[tuple[int, str | None, str | bytes]]:
    client = app.test_client()
    answers = []
    for method, path, headers in _REQUESTS * 2:
        response = await client.open(path, method=method, headers=headers)  # type: ignore[call-arg]
        answers.append(
            (response.status_code, response.headers.get("Location"), await response.get_data())
        )
    return answers


async def test_routes_and_lengths_are_quarts() -> None:
    """The remembered binding and match, and the length read from the scope, answer every
    request as Quart does: the match and its arguments, 404, 405, the redirect to the
    trailing slash (with the query), the host's port, and each Content-Length and
    Transfer-Encoding werkzeug's way."""
    ours = await _answers(_routed_app(ServiceQuart(__name__)))
    assert ours == await _answers(_routed_app(Quart(__name__)))
    assert {status for status, _, _ in ours} == {200, 308, 404, 405}


async def test_a_host_not_the_server_name_is_still_warned_of() -> None:
    """With SERVER_NAME set, a request to another host is bound as Quart binds it (an
    invalid subdomain: no route matches) and warned of."""
    answers = []
    for app in (ServiceQuart(__name__), Quart(__name__)):
        app.config["SERVER_NAME"] = "api.example"
        client = _routed_app(app).test_client()
        with pytest.warns(UserWarning, match="doesn't match configured server name"):
            response = await client.get("/things/7", headers={"Host": "elsewhere.example"})
        answers.append(response.status_code)
        ok = await client.get("/things/7", headers={"Host": "api.example"})
        answers.append(ok.status_code)
    assert answers == [404, 200, 404, 200]


async def test_a_bad_host_is_refused_each_time() -> None:
    """A host that cannot be IDNA-encoded is refused every time (a binding that raised is
    not remembered): by Quart with werkzeug's BadHost from the binding, before any error
    handler (the server then answers 500); here as the request's routing failure, which
    the app's error handlers answer (a 400), and the next good host is served."""
    with pytest.raises(BadHost):
        await _routed_app(Quart(__name__)).test_client().get("/", headers={"Host": "a..b"})
    client = _routed_app(ServiceQuart(__name__)).test_client()
    for host in ("a..b", "a..b", "x" * 64 + ".example"):
        response = await client.get("/things/7", headers={"Host": host})
        assert response.status_code == 400
        assert "Host header" in await response.get_data(as_text=True)
    assert (await client.get("/things/7", headers={"Host": "good.example"})).status_code == 200


async def test_a_response_still_sending_at_its_time_limit_is_dropped() -> None:
    """Quart's response time limit holds with the send in the request's own task: a body
    that stalls is cut off at the limit, and the request ends (rather than hanging)."""
    app = ServiceQuart(__name__)
    stalled = asyncio.Event()

    @app.get("/stall")
    async def stall() -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            stalled.set()
            await asyncio.Event().wait()  # never set
            yield b"never"

        response = Response(body())
        response.timeout = 0.2
        return response

    async with asyncio.timeout(10):
        response = await app.test_client().get("/stall")
        assert await response.get_data() == b"first"
    assert stalled.is_set()


def test_ids_are_unique_and_well_formed_across_threads() -> None:
    found: list[list[str]] = []

    def make() -> None:
        found.append([new_id() for _ in range(5000)])  # more than a buffer's worth

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [i for batch in found for i in batch]
    assert len(set(ids)) == len(ids) == 20000
    assert all(is_id(i) for i in ids)


def _in_child(task: str) -> str:
    """``task`` run in a forked child (``os.fork``): what it printed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write the answer, exit at once
        try:
            answer = new_id() if task == "id" else str(multiprocess._pid())
            os.write(write, answer.encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:
            answer = pipe.read().decode()
    finally:
        os.waitpid(pid, 0)
    if task == "pid":
        return f"{answer} {pid}"
    return answer


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads running
def test_a_forked_child_makes_ids_of_its_own() -> None:
    """A child does not reuse the random bytes its parent had buffered: the id it makes
    next is not the one its parent makes next."""
    new_id()  # the buffer is filled, with ids to come
    child = _in_child("id")
    assert is_id(child)
    assert child != new_id()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_forked_child_knows_its_own_pid_for_the_metrics() -> None:
    """The metrics' files are named for the process writing them: a forked child's pid is
    its own, not the one remembered by its parent."""
    told, actual = _in_child("pid").split()
    assert told == actual != str(os.getpid())


def _scope(path: str) -> dict[str, object]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"x")], "extensions": {},
    }  # fmt: skip


async def test_a_disconnect_cancels_the_handling_and_ends_the_request_quietly() -> None:
    """As under Quart: the client going away cancels the view (its cleanup runs), and the
    request ends without an error and without a response."""
    app = ServiceQuart(__name__)
    started, cleaned_up = asyncio.Event(), asyncio.Event()

    @app.get("/wait")
    async def wait() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.set()
        return "never"

    messages = 0
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        nonlocal messages
        messages += 1
        if messages == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await started.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await app.startup()
    try:
        async with asyncio.timeout(10):
            await app(_scope("/wait"), receive, send)  # type: ignore[arg-type]
    finally:
        await app.shutdown()
    assert cleaned_up.is_set()
    assert sent == []


async def test_a_cancel_from_the_server_still_cancels_the_request() -> None:
    """A cancellation from outside (the server's) is not taken for a disconnect: it goes on
    out of the app."""
    app = ServiceQuart(__name__)
    started = asyncio.Event()

    @app.get("/wait")
    async def wait() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    async def receive() -> dict[str, object]:
        await asyncio.Event().wait()  # no disconnect
        raise AssertionError("unreachable")

    async def send(_: dict[str, object]) -> None:
        pass

    await app.startup()
    try:
        task = asyncio.ensure_future(app(_scope("/wait"), receive, send))  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task
    finally:
        await app.shutdown()
