"""/openapi.json and /docs, and every answer of the API against the model it documents."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import msgspec
import orjson
import pytest
from quart import Quart
from quart.typing import TestClientProtocol as QuartClient
from quart_schema.validation import QUART_SCHEMA_RESPONSE_ATTRIBUTE

from devtools.embedded_redis import free_port
from pipeline.plan import resolve as resolve_plan
from pipeline.version import __version__
from service.app import create_app
from service.openapi import resolve
from tests.helpers import RedisServer
from tests.processes import child_env, request, web

JSON = {"Content-Type": "application/json"}
OPERATIONS = {
    "/signup": {"post"},
    "/users/{user_id}": {"get"},
    "/stats": {"get"},
    "/healthz": {"get"},
    "/readyz": {"get"},
}


def refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


async def test_openapi_document_describes_the_api(client: QuartClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    document = await response.get_json()
    assert document["openapi"].startswith("3.1")
    assert document["info"]["version"] == __version__
    assert {path: set(ops) for path, ops in document["paths"].items()} == OPERATIONS

    components = document["components"]["schemas"]
    found = set(refs(document))
    assert "#/components/schemas/Profile" in found
    for ref in found:
        assert ref.removeprefix("#/components/schemas/") in components, ref

    signup = document["paths"]["/signup"]["post"]
    assert signup["operationId"] == "post_signup"
    assert set(signup["requestBody"]["content"]) == {
        "application/json",
        "application/x-www-form-urlencoded",
    }
    body = signup["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["username", "email"]
    assert body["additionalProperties"] is False
    assert set(signup["responses"]) == {
        "201",
        "400",
        "408",
        "409",
        "413",
        "415",
        "422",
        "429",
        "503",
    }
    invalid = signup["responses"]["422"]["content"]["application/json"]["schema"]
    assert invalid["required"] == ["error", "message", "fields"]
    assert signup["responses"]["503"]["headers"]["Retry-After"]["schema"] == {"type": "integer"}
    assert {p["name"] for p in signup["parameters"]} == {"Idempotency-Key", "X-Request-ID"}

    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["summary"], (path, method)
            for status, answer in operation["responses"].items():
                assert answer["description"], (path, method, status)
                assert set(answer["content"]) == {"application/json"}, (path, method, status)
                assert "X-Request-ID" in answer["headers"], (path, method, status)


async def test_docs_serve_swagger_ui_for_the_document(client: QuartClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = await response.get_data(as_text=True)
    assert 'data-url="/openapi.json"' in page
    # Everything the page loads is this app's own: no other host is named, and the policy
    # lets the browser load nothing from one.
    assert "//" not in page.replace("<!DOCTYPE html>", "")
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "default-src 'none'" in policy
    for asset in re.findall(r'(?:src|href)="([^"]+)"', page):
        loaded = await client.get(asset)
        assert loaded.status_code == 200, asset
        assert len(await loaded.get_data()) > 0
    start = await (await client.get(re.findall(r'src="([^"]*start[^"]*)"', page)[0])).get_data()
    assert b"SwaggerUIBundle(" in start


@pytest.mark.parametrize("name", ["index.html", "..%2Fswagger_ui_bundle", "swagger-ui.js.map"])
async def test_docs_serve_only_the_files_the_page_uses(client: QuartClient, name: str) -> None:
    assert (await client.get(f"/docs/{name}")).status_code == 404


def documented_model(app: Quart, method: str, path: str, status: int) -> type[Any]:
    """The model the route serving ``method path`` documents for ``status``."""
    endpoint, _ = app.url_map.bind("localhost").match(path, method)
    documented = getattr(app.view_functions[endpoint], QUART_SCHEMA_RESPONSE_ATTRIBUTE)
    assert status in documented, f"{method} {path} answered {status}, which is not documented"
    model: type[Any] = documented[status][0]
    return resolve(app, model)  # the app's own model where the view names a stand-in


async def check(
    app: Quart, client: QuartClient, method: str, path: str, status: int, **kwargs: Any
) -> Any:
    """Send a request; its answer has ``status`` and decodes strictly as the documented
    model (no missing, unknown or mistyped field)."""
    response = await client.open(path, method=method, **kwargs)
    assert response.status_code == status, await response.get_data(as_text=True)
    assert response.headers["X-Request-ID"]
    model = documented_model(app, method, path.partition("?")[0], status)
    return msgspec.json.decode(await response.get_data(), type=model)


async def test_every_answer_matches_its_documented_model(
    app: Any, client: QuartClient, settings: Any
) -> None:
    quart_app: Quart = app.app
    alice = {"username": "alice", "email": "alice@example.com"}
    created = await check(
        quart_app, client, "POST", "/signup", 201, data=orjson.dumps(alice), headers=JSON
    )
    await check(
        quart_app, client, "POST", "/signup", 201, form={"username": "bob", "email": "b@x.org"}
    )
    conflict = await check(
        quart_app, client, "POST", "/signup", 409, data=orjson.dumps(alice), headers=JSON
    )
    assert conflict.field == "username"
    invalid = await check(
        quart_app, client, "POST", "/signup", 422, data=b'{"username": 1, "x": 2}', headers=JSON
    )
    assert set(invalid.fields) == {"username", "email", "x"}
    await check(quart_app, client, "POST", "/signup", 400, data=b"{", headers=JSON)
    await check(
        quart_app, client, "POST", "/signup", 415, data=b"x", headers={"Content-Type": "text/x"}
    )
    await check(
        quart_app,
        client,
        "POST",
        "/signup",
        413,
        data=b" " * (settings.max_body_bytes + 1),
        headers=JSON,
    )

    user = await check(quart_app, client, "GET", f"/users/{created.user_id}", 200)
    assert user.profile is None
    await check(quart_app, client, "GET", "/users/nobody", 404)
    stats = await check(quart_app, client, "GET", "/stats", 200)
    assert stats.users == 2
    await check(quart_app, client, "GET", "/healthz", 200)
    await check(quart_app, client, "GET", "/readyz", 200)


async def test_answers_without_redis_match_their_documented_models(make_settings: Any) -> None:
    app = create_app(
        resolve_plan(make_settings({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}))
    )
    async with app.test_app() as test_app:
        client = test_app.test_client()
        body = orjson.dumps({"username": "alice", "email": "alice@example.com"})
        await check(app, client, "POST", "/signup", 503, data=body, headers=JSON)
        await check(app, client, "GET", f"/users/{'0' * 32}", 503)
        await check(app, client, "GET", "/stats", 503)
        await check(app, client, "GET", "/readyz", 503)
        await check(app, client, "GET", "/healthz", 200)


@pytest.mark.parametrize("path", ["/redocs", "/scalar"])
async def test_only_one_docs_page_is_served(client: QuartClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404


async def test_hypercorn_serves_the_document_and_the_docs(
    spawn: Any, redis_server: RedisServer, client: QuartClient
) -> None:
    expected = await (await client.get("/openapi.json")).get_json()
    async with web(spawn, child_env(redis_server)) as (port, _):
        status, headers, document = await request(port, "GET", "/openapi.json")
        assert status == 200
        assert document == expected
        status, headers, page = await request(port, "GET", "/docs")
        assert status == 200
        assert headers["content-type"].startswith("text/html")
        assert b"/openapi.json" in page


async def test_a_429_matches_its_documented_model(make_settings: Any, redis: Any) -> None:
    app = create_app(resolve_plan(make_settings({"RATE_LIMIT": "1/60"})))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        for n, status in enumerate([201, 429]):
            body = orjson.dumps({"username": f"user{n}", "email": f"u{n}@example.com"})
            await check(app, client, "POST", "/signup", status, data=body, headers=JSON)
