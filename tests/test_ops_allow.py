"""``/stats`` and ``/metrics`` answer only the clients ``OPS_ALLOW`` lets in (by default this
host and private networks); the rest get the 404 of a route that does not exist."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.plan import resolve
from pipeline.settings import OPS_NETWORKS
from service.app import create_app
from tests.helpers import RedisServer
from tests.processes import child_env, http, request, web

OPERATIONAL = ("/stats", "/metrics")


async def answers(make_settings: Any, env: dict[str, str], **request: Any) -> list[int]:
    """The status of each operational route for one request shape."""
    async with create_app(resolve(make_settings(env))).test_app() as test_app:
        client = test_app.test_client()
        return [(await client.get(path, **request)).status_code for path in OPERATIONAL]


@pytest.mark.parametrize(
    ("peer", "status"),
    [
        ("127.0.0.1", 200),
        ("::1", 200),
        ("10.20.30.40", 200),
        ("172.31.0.9", 200),
        ("192.168.1.4", 200),
        ("fd12:3456::7", 200),
        ("::ffff:10.0.0.5", 200),  # an IPv4-mapped address, as its IPv4 one
        ("203.0.113.9", 404),
        ("2001:db8::1", 404),
        ("172.32.0.1", 404),  # just outside 172.16.0.0/12
    ],
)
async def test_by_default_this_host_and_private_networks_only(
    make_settings: Any, redis: Any, peer: str, status: int
) -> None:
    assert await answers(make_settings, {}, scope_base={"client": (peer, 5000)}) == [status] * 2


async def test_a_refused_client_sees_the_404_of_a_missing_route(
    make_settings: Any, redis: Any
) -> None:
    async with create_app(resolve(make_settings())).test_app() as test_app:
        client = test_app.test_client()
        outside = {"client": ("203.0.113.9", 5000)}
        refused = await client.get("/stats", scope_base=outside)
        missing = await client.get("/nowhere", scope_base=outside)
        assert refused.status_code == missing.status_code == 404
        assert (await refused.get_json())["error"] == "not_found"
        # No client address (a Unix socket's peer): refused, never taken for local.
        assert (await client.get("/metrics", scope_base={"client": None})).status_code == 404
        # The public routes are not operational ones.
        assert (await client.get("/healthz", scope_base=outside)).status_code == 200
        assert (await client.get("/openapi.json", scope_base=outside)).status_code == 200


async def test_the_setting_widens_or_narrows_it(make_settings: Any, redis: Any) -> None:
    outside = {"scope_base": {"client": ("203.0.113.9", 5000)}}
    assert await answers(make_settings, {"OPS_ALLOW": "0.0.0.0/0,::/0"}, **outside) == [200] * 2
    assert await answers(make_settings, {"OPS_ALLOW": "203.0.113.0/24"}, **outside) == [200] * 2
    loopback = {"scope_base": {"client": ("127.0.0.1", 5000)}}
    assert await answers(make_settings, {"OPS_ALLOW": "10.0.0.0/8"}, **loopback) == [404] * 2
    assert make_settings().ops_allow == OPS_NETWORKS


async def test_behind_a_trusted_proxy_the_client_is_the_forwarded_one(
    make_settings: Any, redis: Any
) -> None:
    # The proxy is on this host; the client it forwards for is not.
    env = {"TRUSTED_PROXIES": "127.0.0.1"}
    via_proxy = {"client": ("127.0.0.1", 5000)}
    outside = {"X-Forwarded-For": "203.0.113.9"}
    inside = {"X-Forwarded-For": "10.1.1.1"}
    assert await answers(make_settings, env, scope_base=via_proxy, headers=outside) == [404] * 2
    assert await answers(make_settings, env, scope_base=via_proxy, headers=inside) == [200] * 2


async def test_a_real_server_refuses_a_client_outside(
    spawn: Any, redis_server: RedisServer
) -> None:
    env = child_env(redis_server, OPS_ALLOW="10.0.0.0/8")  # not loopback, where the test is
    async with web(spawn, env, ready_path="/healthz") as (port, _):
        assert (await http(port, "GET", "/stats"))[0] == 404
        status, _, body = await request(port, "GET", "/metrics")
        assert status == 404 and b"signup_" not in body
        assert (await http(port, "POST", "/signup", {"username": "al", "email": "x"}))[0] == 422
