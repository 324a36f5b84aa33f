"""Redis Cluster, through a ``redis+cluster://`` URL: every key under the prefix's hash tag, so
one slot holds them all and the primary that owns it serves the whole pipeline, found by
asking the URL's nodes.

Three nodes of the run's server kind in cluster mode, the slots spread over them. A plain
``redis://`` URL naming a node that does not own the prefix's slot is refused clearly: the node
answers ``MOVED``, the web answers 503 (never a 500) and the consumer backs off as in an
outage, each saying once that the URL names a cluster node.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import trustme
from redis.crc import key_slot

from devtools.embedded_redis import free_port, wait_until_ready
from tests.helpers import SmtpSink, debian_redis, eventually
from tests.processes import ROOT, child_env, consumer_argv, http, request, web
from tests.servers import Scratch
from tests.test_failover import Stream, kill, processed, report

PREFIX = "{signup}"
NOT_SUPPORTED = "name the cluster with redis+cluster://host:port"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[Scratch]]:
    """Three primaries, slots 0-5460, 5461-10922 and 10923-16383."""
    nodes: list[Scratch] = []
    try:
        yield await form_cluster(tmp_path, nodes, replicas=False)
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
async def replicated(tmp_path: Path) -> AsyncIterator[ClusterTopology]:
    """Three primaries as in ``cluster``, each with a replica, the slot's owner with a second
    one (so that, failed over, it still has one to confirm ``REDIS_MIN_REPLICAS=1``), and
    ``cluster-node-timeout`` 1000 ms: a primary that dies is failed over in seconds."""
    nodes: list[Scratch] = []
    try:
        yield ClusterTopology(await form_cluster(tmp_path, nodes, replicas=True))
    finally:
        for node in nodes:
            node.stop()


async def form_cluster(tmp_path: Path, nodes: list[Scratch], *, replicas: bool) -> list[Scratch]:
    """Start the nodes (appended to ``nodes`` as they start, for the caller to stop), give
    the first three the slots, and make the next three their replicas, in order, and a
    seventh a second replica of the slot's owner."""
    # The bus ports are given: the default, port + 10000, may not exist for a free port.
    count = 7 if replicas else 3
    buses = [free_port() for _ in range(count)]
    for n, bus in enumerate(buses):
        node = Scratch(tmp_path / f"node-{n}")
        nodes.append(node)
        await node.start(
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(bus), "--cluster-node-timeout", "1000",
        )  # fmt: skip
    for node, (first, last) in zip(nodes, BOUNDS, strict=False):
        _client(node).execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
    for node, bus in zip(nodes[1:], buses[1:], strict=True):
        _client(nodes[0]).execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus)

    def known() -> bool:
        return all(
            f"cluster_known_nodes:{count}".encode() in _client(n).execute_command("CLUSTER", "INFO")
            for n in nodes
        )

    await eventually(known, timeout=30, what="the nodes to meet")
    primaries = nodes[:3]
    for replica, primary in zip(nodes[3:], [*primaries, _owning(primaries)], strict=False):
        _client(replica).execute_command("CLUSTER", "REPLICATE", _node_id(primary))

    def formed() -> bool:
        ok = all(
            b"cluster_state:ok" in _client(n).execute_command("CLUSTER", "INFO") for n in nodes
        )
        synced = all(
            _client(n).info("replication").get("master_link_status") == "up" for n in nodes[3:]
        )
        return ok and synced

    await eventually(formed, timeout=30, what="the cluster to form")
    return nodes


@dataclass
class ClusterTopology:
    """A cluster with replicas: ``primary()`` is the node that owns the prefix's slot now."""

    nodes: list[Scratch]

    @property
    def url(self) -> str:  # two nodes that are not the slot's owner nor its replica
        owner = _owning(self.nodes)
        others = [n for n in self.nodes[:3] if n is not owner]
        return cluster_url(*others)

    def primary(self) -> Scratch:
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            for first, last, primary, *_ in _client(node).execute_command("CLUSTER", "SLOTS"):
                if first <= _slot() <= last:
                    return next(n for n in self.nodes if n.port == primary[1])
        raise AssertionError("no live node names the slot's owner")


def _client(node: Scratch) -> redis.Redis:
    return redis.Redis(port=node.port, socket_timeout=5)


BOUNDS = ((0, 5460), (5461, 10922), (10923, 16383))


def _slot() -> int:
    return key_slot(b"signup")


def _not_owning(nodes: list[Scratch]) -> Scratch:
    return next(n for n, (a, b) in zip(nodes, BOUNDS, strict=True) if not a <= _slot() <= b)


def _owning(nodes: list[Scratch]) -> Scratch:
    return next(n for n, (a, b) in zip(nodes, BOUNDS, strict=True) if a <= _slot() <= b)


def cluster_url(*nodes: Scratch) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes)


async def signups(port: int, count: int, start: int = 0) -> list[tuple[int, Any]]:
    answers = []
    for n in range(start, start + count):
        body = {"username": f"clustered{n}", "email": f"clustered{n}@example.com"}
        answers.append(await http(port, "POST", "/signup", body))
    return answers


async def signed_up_and_done(port: int, count: int) -> list[tuple[int, Any]]:
    """``count`` signups, each a 201, then every one's jobs done (emails sent, profiles
    generated); their answers."""
    answers = await signups(port, count)
    assert [status for status, _ in answers] == [201] * count, answers

    async def done() -> bool:
        status, stats = await http(port, "GET", "/stats")
        assert status == 200
        return all(stats[c] == count for c in ("emails_sent", "profiles_generated"))

    await eventually(done, timeout=30, what="every job of the signups")
    return answers


def test_the_ports_given_for_nodes_and_their_buses_never_repeat() -> None:
    """A node's port and a bus port are asked for before either is listened on: the kernel
    hands a port it just freed out again often enough (a node once got its own bus port and
    could not start), so free_port never gives one port twice."""
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)


async def test_the_pipeline_runs_on_a_cluster_through_a_node_that_does_not_own_the_slot(
    spawn: Any, cluster: list[Scratch]
) -> None:
    """The URL names one node, not the owner: the rest are learnt from it, and every key
    lives under ``{signup}`` on the slot's owner."""
    env = child_env(cluster_url(_not_owning(cluster)))
    worker = spawn(consumer_argv(), env)
    async with web(spawn, env, ready_path="/readyz") as (port, child):
        answers = await signed_up_and_done(port, 20)
        user_id = answers[0][1]["user_id"]
        status, user = await http(port, "GET", f"/users/{user_id}")
        assert status == 200 and user["profile"] is not None
        output = child.output()
    owner = _client(_owning(cluster))
    assert all(key.startswith(b"{signup}:") for key in owner.keys("*"))
    assert owner.hget(b"{signup}:stats", "users") == b"20"
    assert [_client(n).dbsize() for n in cluster if n is not _owning(cluster)] == [0, 0]
    assert " 500 " not in output and "Traceback" not in output
    # The operator's commands take the same URL.
    stats = admin_command(env, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert orjson.loads(stats.stdout)["users"] == 20
    assert await worker.stop() == 0


def test_a_prefix_whose_keys_would_not_share_a_slot_is_refused(cluster: list[Scratch]) -> None:
    env = child_env(cluster_url(cluster[0]), KEY_PREFIX="{}signup")
    result = admin_command(env, "stats")
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "KEY_PREFIX='{}signup': with a cluster URL every key must hash to one slot: give the "
        "prefix a non-empty hash tag that ends within it ({signup}, app-{signup}) or no "
        "braces at all"
    ), result.stderr


def admin_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        consumer_argv(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=30
    )


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


def _node_id(node: Scratch) -> bytes:
    found: bytes = _client(node).execute_command("CLUSTER", "MYID")
    return found


def move_slot(nodes: list[Scratch], slot: int, source: Scratch, target: Scratch) -> int:
    """Move ``slot`` from ``source`` to ``target`` as ``redis-cli --cluster reshard`` does:
    IMPORTING and MIGRATING, its keys MIGRATEd in batches, then the new owner announced to
    every node. Returns how many keys moved."""
    to, from_ = _client(target), _client(source)
    to.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", _node_id(source))
    from_.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", _node_id(target))
    moved = 0
    while keys := from_.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 50):
        from_.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        moved += len(keys)
    for node in (target, source, *(n for n in nodes if n not in (source, target))):
        _client(node).execute_command("CLUSTER", "SETSLOT", slot, "NODE", _node_id(target))
    return moved


async def test_the_slot_moved_to_another_primary_while_signups_stream_is_followed(
    spawn: Any, cluster: list[Scratch]
) -> None:
    """Every 201 is a user whose three jobs ran; the migration's refusals are 503s (an
    outage), never a 500; both processes follow the slot to its new owner by themselves."""
    source = _owning(cluster)
    target = next(n for n in cluster if n is not source)
    env = child_env(cluster_url(cluster[0], cluster[1]))
    worker = spawn(consumer_argv(), env)
    async with web(spawn, env, ready_path="/readyz") as (port, child):
        statuses: list[int] = []
        stop = asyncio.Event()

        async def stream() -> None:
            n = 0
            while not stop.is_set():
                body = {"username": f"moving{n}", "email": f"moving{n}@example.com"}
                statuses.append((await http(port, "POST", "/signup", body))[0])
                n += 1

        streaming = asyncio.create_task(stream())
        await eventually(lambda: statuses.count(201) >= 20, what="signups before the move")
        began = time.monotonic()
        moved = await asyncio.to_thread(move_slot, cluster, _slot(), source, target)
        took = time.monotonic() - began
        before = len(statuses)
        await eventually(
            lambda: statuses[before:].count(201) >= 20, timeout=30, what="signups after it"
        )
        stop.set()
        await streaming
        accepted = statuses.count(201)
        assert set(statuses) <= {201, 503}, statuses
        print(f"moved {moved} keys in {took:.2f} s; {accepted} signups accepted, "
              f"{statuses.count(503)} answered 503")  # fmt: skip

        async def done() -> bool:
            status, stats = await http(port, "GET", "/stats")
            return status == 200 and all(
                stats[c] == accepted
                for c in ("emails_sent", "marketing_list_updates", "profiles_generated")
            )

        await eventually(done, timeout=60, what="every accepted signup's jobs")
        assert (await http(port, "GET", "/stats"))[1]["users"] == accepted
        output = child.output()
    assert moved > 0
    assert _client(target).hget(b"{signup}:stats", "users") == str(accepted).encode()
    assert _client(source).dbsize() == 0
    assert " 500 " not in output and "Traceback" not in output
    assert await worker.stop() == 0
    assert "Traceback" not in worker.output()


@pytest.mark.timeout(120)
async def test_the_slots_primary_killed_under_a_stream_loses_no_201_and_both_follow(
    replicated: ClusterTopology, spawn: Any, smtp_server: SmtpSink
) -> None:
    """``kill -9`` of the slot's primary with ``REDIS_MIN_REPLICAS=1``: its replica is
    promoted by the cluster, both processes find it by themselves, and every 201 is a user
    whose three jobs ran."""
    env = child_env(replicated.url, REDIS_MIN_REPLICAS="1", SMTP_URL=smtp_server.url)
    async with web(spawn, env, ready_path="/readyz") as (port, web_process):
        worker = spawn(consumer_argv(), env)
        stream = Stream(port)
        old, killed_at = await stream.around(replicated, kill, before=30, after=30)
        accepted, statuses = stream.accepted(), stream.statuses()
        first_after = min(o.accepted_at for o in accepted if o.sent_at > killed_at)
        await processed(port, smtp_server, accepted, worker)
        assert set(statuses) <= {201, 503}, statuses  # no 500, nothing but a retryable 503
        assert replicated.primary() is not old
        assert web_process.process.poll() is None and worker.process.poll() is None
        emails = smtp_server.recipients()
        report(
            cluster=True,
            min_replicas=1,
            accepted=len(accepted),
            first_201_after_kill_s=round(first_after - killed_at, 2),
            answers_503=statuses.count(503),
            lost=0,
            emails_repeated=len(emails) - len(set(emails)),
        )
        output = web_process.output()
        assert await worker.stop(20) == 0
    assert " 500 " not in output and "Traceback" not in output


@dataclass
class TlsNode:
    plain: int
    tls: int
    process: subprocess.Popen[bytes]


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[list[TlsNode], Path]]:
    """Three primaries of a redis-server built with TLS (``make test`` fetches Debian's),
    serving clients and each other over TLS with a certificate from a private CA; their plain
    ports, on loopback, are for the test's own set-up and checks. Yields them and the CA."""
    binary = debian_redis()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    nodes: list[TlsNode] = []
    buses = []
    try:
        for n in range(3):
            directory = tmp_path / f"node-{n}"
            directory.mkdir()
            plain, tls, bus = free_port(), free_port(), free_port()
            argv = [
                binary, "--port", str(plain), "--tls-port", str(tls), "--bind", "127.0.0.1",
                "--tls-cert-file", str(tmp_path / "cert.pem"),
                "--tls-key-file", str(tmp_path / "key.pem"),
                "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no",
                "--tls-cluster", "yes", "--tls-replication", "yes", "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--cluster-port", str(bus),
                "--dir", str(directory), "--save", "", "--appendonly", "no",
            ]  # fmt: skip
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
            nodes.append(TlsNode(plain, tls, process))
            buses.append(bus)
            wait_until_ready(plain, time.monotonic() + 15, process)
        for node, (first, last) in zip(nodes, BOUNDS, strict=True):
            redis.Redis(port=node.plain).execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for node, bus in zip(nodes[1:], buses[1:], strict=True):  # the bus is TLS too
            redis.Redis(port=nodes[0].plain).execute_command(
                "CLUSTER", "MEET", "127.0.0.1", node.tls, bus
            )
        deadline = time.monotonic() + 30
        while not all(
            b"cluster_state:ok" in redis.Redis(port=n.plain).execute_command("CLUSTER", "INFO")
            for n in nodes
        ):
            assert time.monotonic() < deadline, "the TLS cluster did not form"
            time.sleep(0.1)  # a poll with a deadline, in a sync fixture
        yield nodes, tmp_path / "ca.pem"
    finally:
        for node in nodes:
            node.process.terminate()
            node.process.wait(10)


async def test_the_pipeline_runs_on_a_tls_cluster(
    spawn: Any, tls_cluster: tuple[list[TlsNode], Path]
) -> None:
    """``rediss+cluster://`` with ``REDIS_CA_FILE``: the nodes the URL names and the primary
    they point to are all reached over verified TLS."""
    nodes, ca_file = tls_cluster
    owner, *others = sorted(nodes, key=lambda n: n is not nodes[_owner_index()])
    url = "rediss+cluster://" + ",".join(f"127.0.0.1:{n.tls}" for n in others)
    env = child_env(url, REDIS_CA_FILE=str(ca_file))
    worker = spawn(consumer_argv(), env)
    async with web(spawn, env, ready_path="/readyz") as (port, child):
        await signed_up_and_done(port, 10)
        output = child.output()
    assert redis.Redis(port=owner.plain).hget(b"{signup}:stats", "users") == b"10"
    assert " 500 " not in output and "Traceback" not in output
    # Without the CA, the certificate is not trusted: refused, a 503 (never a 500).
    untrusted = admin_command(child_env(url), "stats")
    assert untrusted.returncode == 1 and "certificate verify failed" in untrusted.stderr
    assert await worker.stop() == 0


def _owner_index() -> int:
    return next(i for i, (a, b) in enumerate(BOUNDS) if a <= _slot() <= b)


async def test_a_consumer_killed_holding_jobs_is_recovered_and_dead_letters_are_operated(
    spawn: Any, cluster: list[Scratch], smtp_server: SmtpSink
) -> None:
    """The leases, the recovery script and the operator's commands on a cluster: a consumer
    killed holding jobs has them run by another; a job that always fails is dead-lettered,
    listed, requeued and runs; the metrics read the queues."""
    smtp_server.delay, smtp_server.stall_at = 60, "rcpt"
    url = cluster_url(_not_owning(cluster))
    env = child_env(url, SMTP_URL=smtp_server.url, CONSUMER_CONCURRENCY="email=2")
    owner = _client(_owning(cluster))
    async with web(spawn, child_env(url), ready_path="/readyz") as (port, _):
        first = spawn(consumer_argv(), env)
        answers = await signups(port, 4)
        assert [status for status, _ in answers] == [201] * 4
        await eventually(lambda: smtp_server.started == 2, what="2 jobs held by the consumer")
        first.signal(signal.SIGKILL)
        assert await first.wait(5) == -signal.SIGKILL
        smtp_server.delay = 0
        second = spawn(consumer_argv(), env)
        await eventually(
            lambda: len(set(smtp_server.recipients())) == 4, timeout=20, what="every email"
        )
        assert "recovered consumer" in second.output()
        # A job that always fails: dead-lettered, then requeued from the CLI, and it runs.
        smtp_server.reject = "550 5.1.1 mailbox unavailable"
        answers = await signups(port, 1, start=10)
        await eventually(lambda: owner.llen(b"{signup}:dead") == 1, timeout=30, what="the dead")
        listed = admin_command(env, "dead", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        [entry] = orjson.loads(listed.stdout)
        smtp_server.reject = None
        requeued = admin_command(env, "dead", "requeue", entry["id"])
        assert (requeued.returncode, requeued.stdout.strip()) == (0, "requeued 1 jobs")
        await eventually(
            lambda: "clustered10@example.com" in smtp_server.recipients(), what="the requeued"
        )
        status, _, metrics = await request(port, "GET", "/metrics")
        assert status == 200 and b'signup_queue_depth{queue="email"} 0.0' in metrics
        assert await second.stop() == 0
