"""Redis Cluster is not supported: a ``REDIS_URL`` naming a cluster node is refused clearly.

Three nodes of the run's server kind in cluster mode, the slots spread over them, and
``KEY_PREFIX={signup}`` as a cluster user would set it. Pointed at a node that does not own the
prefix's slot, the node answers ``MOVED``: the web answers 503 (never a 500) and the consumer
backs off as in an outage, each saying once that the URL points at a Redis Cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.embedded_redis import free_port
from tests.helpers import eventually
from tests.processes import child_env, consumer_argv, http, web
from tests.servers import Scratch

PREFIX = "{signup}"
NOT_SUPPORTED = "REDIS_URL points at a Redis Cluster node, and Redis Cluster is not supported"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[Scratch]]:
    """Three primaries, slots 0-5460, 5461-10922 and 10923-16383."""
    nodes = [Scratch(tmp_path / f"node-{n}") for n in range(3)]
    try:
        # The bus ports are given: the default, port + 10000, may not exist for a free port.
        buses = [free_port() for _ in nodes]
        for node, bus in zip(nodes, buses, strict=True):
            await node.start(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(bus),
            )  # fmt: skip
        for node, (first, last) in zip(
            nodes, ((0, 5460), (5461, 10922), (10923, 16383)), strict=True
        ):
            _client(node).execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for node, bus in zip(nodes[1:], buses[1:], strict=True):
            _client(nodes[0]).execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus)

        def formed() -> bool:
            return all(
                b"cluster_state:ok" in _client(n).execute_command("CLUSTER", "INFO")
                and b"cluster_known_nodes:3" in _client(n).execute_command("CLUSTER", "INFO")
                for n in nodes
            )

        await eventually(formed, timeout=30, what="the cluster to form")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _client(node: Scratch) -> redis.Redis:
    return redis.Redis(port=node.port, socket_timeout=5)


def _not_owning(nodes: list[Scratch]) -> Scratch:
    slot = int(_client(nodes[0]).execute_command("CLUSTER", "KEYSLOT", "signup"))
    bounds = ((0, 5460), (5461, 10922), (10923, 16383))
    return next(n for n, (a, b) in zip(nodes, bounds, strict=True) if not a <= slot <= b)


async def test_a_cluster_node_is_a_503_and_a_retried_outage_saying_why(
    spawn: Any, cluster: list[Scratch]
) -> None:
    node = _not_owning(cluster)
    env = child_env(node.url, KEY_PREFIX=PREFIX)
    worker = spawn(consumer_argv(), env)
    async with web(spawn, env, ready_path="/healthz") as (port, child):
        body = {"username": "clustered", "email": "clustered@example.com"}
        status, answer = await http(port, "POST", "/signup", body)
        assert (status, answer["error"]) == (503, "unavailable")
        for path in ("/stats", "/users/" + "a" * 32):
            assert (await http(port, "GET", path))[0] == 503
        await eventually(lambda: NOT_SUPPORTED in worker.output(), what="the consumer to say why")
        output = child.output()
    assert output.count(NOT_SUPPORTED) == 1, output  # once per worker, not per request
    assert " 500 " not in output and "Traceback" not in output
    # Nothing was written anywhere: each node refused before running a command.
    assert [_client(n).dbsize() for n in cluster] == [0, 0, 0]
    assert worker.process.poll() is None  # backing off, not crashed
    assert await worker.stop() == 0
    outage = [line for line in worker.output().splitlines() if "Redis unavailable (" in line]
    assert len(outage) == 1 and NOT_SUPPORTED in outage[0]  # once, not per loop or retry
