"""High availability with the real thing: a primary, two replicas and three sentinels on
loopback, the web (hypercorn) and a consumer following ``redis+sentinel://`` through a failover
they are never restarted for."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from pipeline.keys import Keys
from pipeline.plan import resolve
from tests.helpers import REGISTRY, SmtpSink, eventually
from tests.processes import ROOT, child_env, consumer_argv, http, request, web
from tests.servers import SERVICE, Scratch, Topology, raw_all

KEYS = Keys("signup")
#: The default reactions' counters: one job of each per signup.
EFFECT_COUNTERS = REGISTRY.effect_counters


@pytest.fixture
async def topology(tmp_path: Path) -> AsyncIterator[Topology]:
    started = Topology(tmp_path / "topology")
    try:
        await started.start()
        yield started
    finally:
        started.stop()


@dataclass
class Outcome:
    """What one client saw of one signup, over its retries."""

    username: str
    statuses: list[int] = field(default_factory=list)
    user_id: str | None = None
    #: When the attempt that got the 201 was sent, and when its answer came.
    sent_at: float = 0.0
    accepted_at: float = 0.0


@dataclass
class Stream:
    """Clients signing up one after another, each retrying a 503 with the same
    Idempotency-Key (as a careful client does) until a 201 or the stream stops."""

    port: int
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, name: str) -> None:
        n = 0
        while not self.stop.is_set():
            outcome = Outcome(f"{name}_{n}")
            self.outcomes.append(outcome)
            await self.sign_up(outcome)
            n += 1

    async def sign_up(self, outcome: Outcome) -> None:
        body = {"username": outcome.username, "email": f"{outcome.username}@example.com"}
        headers = {"Idempotency-Key": f"key-{outcome.username}"}
        while not self.stop.is_set():
            sent_at = time.monotonic()
            try:
                status, _, answer = await request(self.port, "POST", "/signup", body, headers)
            except OSError:
                status, answer = 0, None
            outcome.statuses.append(status)
            if status == 201:
                outcome.user_id, outcome.sent_at = answer["user_id"], sent_at
                outcome.accepted_at = time.monotonic()
                return
            await asyncio.sleep(0.05)  # a client's pause before its retry, not synchronisation

    def accepted(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.user_id is not None]

    async def around(
        self, topology: Topology, event: Callable[[Scratch], None], before: int, after: int
    ) -> tuple[Scratch, float]:
        """Run three clients: ``before`` signups, then ``event`` (given the primary), then
        ``after`` signups sent once it happened (a new primary promoted meanwhile). Returns
        the old primary and when the event happened."""
        clients = [asyncio.create_task(self.client(f"c{i}")) for i in range(3)]
        try:
            await eventually(lambda: len(self.accepted()) >= before, what="signups before")
            old = topology.primary()
            event(old)
            happened = time.monotonic()
            await new_primary(topology, old)

            def since() -> int:
                return sum(1 for o in self.accepted() if o.sent_at > happened)

            await eventually(lambda: since() >= after, timeout=30, what="signups after it")
        finally:
            self.stop.set()
            await asyncio.gather(*clients)
        return old, happened

    def statuses(self) -> list[int]:
        return [status for outcome in self.outcomes for status in outcome.statuses]


async def new_primary(topology: Topology, old: Scratch) -> Scratch:
    async def moved() -> bool:
        try:
            return topology.primary() is not old
        except AssertionError:
            return False

    # Usually 2-4 s; but an election the sentinels split is retried only after twice the
    # failover-timeout (8 s), so a loaded machine may need a few rounds.
    try:
        await eventually(moved, timeout=60, what="the sentinels to promote a replica")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}\n{topology.sentinel_logs()}") from None
    return topology.primary()


async def all_processed(port: int, smtp: SmtpSink, accepted: list[Outcome]) -> bool:
    if not {f"{o.username}@example.com" for o in accepted} <= set(smtp.recipients()):
        return False
    for outcome in accepted:
        status, user = await http(port, "GET", f"/users/{outcome.user_id}")
        if status != 200 or user["profile"] is None:
            return False
    return True


@pytest.mark.timeout(180)
async def test_a_primary_killed_under_a_stream_loses_no_201_and_both_processes_follow(
    topology: Topology, spawn: Any, smtp_server: SmtpSink
) -> None:
    env = child_env(topology.url, REDIS_MIN_REPLICAS="1", SMTP_URL=smtp_server.url)
    async with web(spawn, env) as (port, web_process):
        worker = spawn(consumer_argv(), env)
        stream = Stream(port)
        _, killed_at = await stream.around(topology, kill, before=30, after=30)
        accepted, statuses = stream.accepted(), stream.statuses()
        # The first 201 to a request sent after the kill.
        first_after = min(o.accepted_at for o in accepted if o.sent_at > killed_at)
        # Every signup that got a 201 is there after the failover, and all its jobs ran.
        await processed(port, smtp_server, accepted, worker)

        # And each job of every signup there is counted once, an email sent twice included:
        # a count goes or stays with the acknowledgement that made it.
        async def counted_once() -> bool:
            _, stats = await http(port, "GET", "/stats")
            return all(stats[c] == stats["users"] for c in EFFECT_COUNTERS)

        await eventually(counted_once, timeout=30, what="every signup's jobs counted once")
        assert set(statuses) <= {201, 503}, statuses  # no 500, nothing but a retryable 503
        assert first_after - killed_at < 15
        # Neither process was restarted.
        assert web_process.process.poll() is None and worker.process.poll() is None
        emails = smtp_server.recipients()
        report(
            min_replicas=1,
            accepted=len(accepted),
            accepted_before_kill=sum(1 for o in accepted if o.sent_at < killed_at),
            first_201_after_kill_s=round(first_after - killed_at, 2),
            answers_503=statuses.count(503),
            lost=0,
            emails_repeated=len(emails) - len(set(emails)),
        )
        assert await worker.stop(20) == 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("min_replicas", [0, 1])
async def test_what_a_failover_loses_without_and_with_replicated_acknowledgement(
    topology: Topology, spawn: Any, min_replicas: int
) -> None:
    """Replicas that fall behind (frozen here), then the primary dies: the signups answered
    in the meantime are on the old primary only. Without REDIS_MIN_REPLICAS they were 201s,
    and are lost; with it they were 503s, and their retries (same key) succeed afterwards."""
    env = child_env(topology.url, REDIS_MIN_REPLICAS=str(min_replicas))
    async with web(spawn, env) as (port, _):
        old = topology.primary()
        replicas = [s for s in topology.servers if s is not old]
        for replica in replicas:
            os.kill(replica.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            answers = []
            for n in range(5):
                body = {"username": f"frozen_{n}", "email": f"frozen_{n}@example.com"}
                headers = {"Idempotency-Key": f"frozen-{n}"}
                answers.append(await request(port, "POST", "/signup", body, headers))
            old.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        finally:
            for replica in replicas:
                os.kill(replica.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
        promoted = await new_primary(topology, old)
        client = aioredis.Redis.from_url(promoted.url)
        try:
            if min_replicas == 0:
                assert [status for status, _, _ in answers] == [201] * 5
                found = [await client.exists(KEYS.user(body["user_id"])) for _, _, body in answers]
                report(min_replicas=0, accepted=5, lost=found.count(0))
                assert found == [0] * 5  # every one of those 201s is gone
            else:
                assert [body["error"] for _, _, body in answers] == ["not_replicated"] * 5
                retried = []
                for n in range(5):
                    body = {"username": f"frozen_{n}", "email": f"frozen_{n}@example.com"}
                    headers = {"Idempotency-Key": f"frozen-{n}"}

                    async def created(body: Any = body, headers: Any = headers) -> bool:
                        status, _, answer = await request(port, "POST", "/signup", body, headers)
                        if status == 201:
                            retried.append(answer["user_id"])
                        return status == 201

                    await eventually(created, timeout=30, what="the retry's 201")
                found = [await client.exists(KEYS.user(user_id)) for user_id in retried]
                assert found == [1] * 5
        finally:
            await client.aclose()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("min_replicas", [2, 1])
async def test_a_demoted_primary_answering_readonly_is_dropped_for_the_new_one(
    topology: Topology, spawn: Any, smtp_server: SmtpSink, min_replicas: int
) -> None:
    """A manual failover (SENTINEL FAILOVER): the old primary stays up, and is demoted to a
    replica only seconds after the new one is promoted. Meanwhile it still takes writes, and
    the replica not promoted still copies (and confirms) them, until it is moved to the new
    primary and drops them. With REDIS_MIN_REPLICAS at the number of replicas, no such write
    is confirmed, so no 201 is lost; with fewer, the 201s of that window are lost (measured,
    not asserted: it depends on timing). Either way the connections to the demoted primary
    are answered READONLY, and both processes drop them for the new primary. Operator
    commands follow the sentinels too."""
    env = child_env(topology.url, REDIS_MIN_REPLICAS=str(min_replicas), SMTP_URL=smtp_server.url)
    async with web(spawn, env) as (port, web_process):
        worker = spawn(consumer_argv(), env)
        stream = Stream(port)

        def fail_over(_: Scratch) -> None:
            assert raw_all(topology.sentinels[0].port, "SENTINEL", "FAILOVER", SERVICE) == ["OK"]

        old, _ = await stream.around(topology, fail_over, before=20, after=20)
        accepted, statuses = stream.accepted(), stream.statuses()
        # What survived: once the old primary is a replica of the new one, and in step with it.
        await eventually(lambda: demoted_and_synced(old), timeout=30, what="the old primary")
        promoted = aioredis.Redis.from_url(topology.primary().url)
        try:
            lost = [o for o in accepted if not await promoted.exists(KEYS.user(o.user_id))]
        finally:
            await promoted.aclose()
        if min_replicas == 2:
            assert not lost, [o.username for o in lost]
        await processed(port, smtp_server, [o for o in accepted if o not in lost], worker)
        assert set(statuses) <= {201, 503}, statuses
        assert old.process is not None and old.process.poll() is None  # still up, demoted
        assert web_process.process.poll() is None and worker.process.poll() is None
        stats = await asyncio.to_thread(admin_command, topology.url, "stats", "--json")
        assert stats.returncode == 0, stats.stderr
        report(
            manual_failover=True,
            min_replicas=min_replicas,
            accepted=len(accepted),
            lost=len(lost),
            answers_503=statuses.count(503),
            emails_repeated=len(smtp_server.recipients()) - len(set(smtp_server.recipients())),
        )
        assert await worker.stop(20) == 0


def kill(server: Scratch) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)


async def processed(port: int, smtp: SmtpSink, accepted: list[Outcome], worker: Any) -> None:
    """Wait until every one of ``accepted`` has its three jobs done; else fail, saying where
    the jobs are."""
    try:
        await eventually(lambda: all_processed(port, smtp, accepted), timeout=60, what="jobs")
    except AssertionError as exc:
        raise AssertionError(await explain(port, smtp, accepted, worker)) from exc


def demoted_and_synced(server: Scratch) -> bool:
    info = raw_all(server.port, "INFO", "replication")[0]
    return "role:slave" in info and "master_link_status:up" in info


async def explain(port: int, smtp: SmtpSink, accepted: list[Outcome], worker: Any) -> str:
    """What is missing, and where the jobs are: for a failure's message."""
    missing_email = [
        o.username for o in accepted if f"{o.username}@example.com" not in smtp.recipients()
    ]
    missing = []
    for outcome in accepted:
        status, user = await http(port, "GET", f"/users/{outcome.user_id}")
        if status != 200 or user["profile"] is None:
            missing.append((outcome.username, status, user))
    _, stats = await http(port, "GET", "/stats")
    return (
        f"no email: {missing_email}\nno user or profile: {missing}\nstats: {stats}\n"
        f"worker:\n{worker.output()[-6000:]}"
    )


def admin_command(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m consumers <args>`` against ``url``."""
    return subprocess.run(
        consumer_argv(*args),
        env=child_env(url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def report(**figures: Any) -> None:
    """The figures the README's High availability table quotes (``pytest -s`` shows them)."""
    print("failover:", " ".join(f"{k}={v}" for k, v in figures.items()))


async def test_passwords_of_the_sentinels_and_of_redis_are_each_used_where_they_belong(
    tmp_path: Path, make_settings: Any
) -> None:
    """REDIS_SENTINEL_PASSWORD is what the sentinels are asked with, the URL's password what
    the primary they name is logged in to with; without the first the sentinels refuse, and
    the signup is a 503 (never a 500)."""
    from service.app import create_app

    primary, sentinel = Scratch(tmp_path / "primary"), Scratch(tmp_path / "sentinel")
    await primary.start("--requirepass", "redis-secret", ready=b"-NOAUTH")
    sentinel.directory.mkdir(parents=True)
    config = sentinel.directory / "sentinel.conf"
    config.write_text(
        f"port {sentinel.port}\nbind 127.0.0.1\ndir {sentinel.directory}\n"
        f"requirepass sentinel-secret\nsentinel monitor {SERVICE} 127.0.0.1 {primary.port} 1\n"
        f"sentinel auth-pass {SERVICE} redis-secret\n"
    )
    try:
        await sentinel.launch([str(config), "--sentinel"], ready=b"-NOAUTH")
        url = f"redis+sentinel://:redis-secret@127.0.0.1:{sentinel.port}/{SERVICE}/0"
        body = {"username": "alice", "email": "alice@example.com"}
        answers = []
        for password in ("sentinel-secret", None):
            env = {"REDIS_URL": url}
            if password:
                env["REDIS_SENTINEL_PASSWORD"] = password
            async with create_app(resolve(make_settings(env))).test_app() as app:
                response = await app.test_client().post("/signup", json=body)
                answers.append((response.status_code, (await response.get_json())["error"]
                                if response.status_code != 201 else "created"))  # fmt: skip
        assert answers == [(201, "created"), (503, "unavailable")]
    finally:
        sentinel.stop()
        primary.stop()


async def test_no_sentinel_naming_a_primary_is_one_short_line(tmp_path: Path) -> None:
    """One sentinel that monitors nothing, one address where nothing listens: the operator's
    command says which sentinels it tried and what each said, in one short line (redis-py's
    own message dumps each sentinel client's pool: some 1,400 characters)."""
    sentinel = Scratch(tmp_path / "sentinel")
    sentinel.directory.mkdir(parents=True)
    config = sentinel.directory / "sentinel.conf"
    config.write_text(f"port {sentinel.port}\nbind 127.0.0.1\ndir {sentinel.directory}\n")
    await sentinel.launch([str(config), "--sentinel"])
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port},127.0.0.1:1/{SERVICE}/0"
        done = await asyncio.to_thread(admin_command, url, "stats")
    finally:
        sentinel.stop()
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert len(line) < 300, line
    assert f"127.0.0.1:{sentinel.port} does not know it" in line
    assert "127.0.0.1:1 connection refused" in line
    assert f"no sentinel named a primary for '{SERVICE}'" in line
