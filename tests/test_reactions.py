"""Reactions: one module each, collected in a registry both processes derive everything from,
and checked at start-up."""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from devtools.embedded_redis import free_port
from pipeline.config import setting
from pipeline.errors import ReactionError, SettingsError
from pipeline.keys import Keys
from pipeline.plan import resolve
from pipeline.registry import JobType, Reaction, Registry, UserField, load_registry
from pipeline.settings import Settings
from pipeline.signals import user_signed_up
from reactions.profile import PROFILE
from reactions.welcome_email import REACTION as WELCOME
from reactions.welcome_email import WELCOME_EMAIL, send_welcome_email
from service.app import create_app
from tests.helpers import REGISTRY, RedisServer, eventually, parse_metrics
from tests.processes import ROOT, child_env, consumer_argv, http, request, web

#: The documented SMS reaction: tests/reactions/sms.py, loaded on top of the default ones; or,
#: once a reader has saved it as reactions/welcome_sms.py, that copy among the defaults.
SMS_MODULE = (
    "reactions.welcome_sms" if "welcome_sms" in REGISTRY.job_types else "tests.reactions.sms"
)
SMS = "reactions" if SMS_MODULE.startswith("reactions.") else f"reactions,{SMS_MODULE}"
sms = importlib.import_module(SMS_MODULE)


class SmsGateway:
    """A real HTTP server standing in for the SMS gateway: keeps each POSTed JSON body."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SmsGateway:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
        self.received.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()


async def test_a_fourth_reaction_runs_end_to_end_from_one_module(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys
) -> None:
    # tests/reactions/sms.py is the whole reaction: receiver, job type on a new queue,
    # handler, counter, its own setting, resource hooks. Nothing else names it but REACTIONS.
    async with SmsGateway() as gateway:
        env = child_env(
            redis_server, REACTIONS=SMS, SMS_GATEWAY_URL=f"http://127.0.0.1:{gateway.port}/sms"
        )
        metrics_port = free_port()
        worker = spawn(consumer_argv("--metrics-port", str(metrics_port)), env)
        await eventually(lambda: "SMS gateway: http://" in worker.output(), what="the hook")
        async with web(spawn, env) as (port, _):
            status, created = await http(
                port, "POST", "/signup", {"username": "alice", "email": "a@example.com"}
            )
            assert status == 201

            async def texted() -> bool:
                return (await http(port, "GET", "/stats"))[1]["sms_sent"] == 1

            await eventually(texted, what="the welcome SMS")
            _, stats = await http(port, "GET", "/stats")
            assert stats["queues"] == {"email": 0, "marketing": 0, "profile": 0, "sms": 0}
            assert stats["emails_sent"] == stats["profiles_generated"] == 1
            _, document = await http(port, "GET", "/openapi.json")
        assert gateway.received == [{"user_id": created["user_id"], "text": "Welcome, alice!"}]
        answer = document["paths"]["/stats"]["get"]["responses"]["200"]
        stats_schema = answer["content"]["application/json"]["schema"]
        assert {"sms_sent", "emails_sent"} <= set(stats_schema["required"])
        assert "sms" in stats_schema["properties"]["queues"]["description"]
        # The consumer's metrics label the new type and queue like the others.
        _, _, text = await request(metrics_port, "GET", "/metrics")
        metrics = parse_metrics(text.decode())
        succeeded = ("signup_jobs_total", (("outcome", "succeeded"), ("type", "welcome_sms")))
        assert metrics[succeeded] == 1
        assert ("signup_job_queue_wait_seconds_count", (("queue", "sms"),)) in metrics
        assert await worker.stop() == 0
    assert "SMS gateway closed" in worker.output()  # the shutdown hook ran
    assert "smsx16" in worker.output()  # served by default, with the default concurrency


def test_a_reaction_setting_is_read_and_checked_by_name(redis_server: RedisServer) -> None:
    SmsSettings = sms.SmsSettings

    plan = resolve(Settings.from_env({"REACTIONS": SMS, "SMS_GATEWAY_URL": "http://gw:8080/"}))
    assert plan.settings_of(SmsSettings).gateway_url == "http://gw:8080/"
    assert resolve(Settings.from_env({"REACTIONS": SMS})).settings_of(SmsSettings) == SmsSettings()
    with pytest.raises(SettingsError) as caught:
        resolve(Settings.from_env({"REACTIONS": SMS, "SMS_GATEWAY_URL": "ftp://gw"}))
    assert str(caught.value) == "SMS_GATEWAY_URL='ftp://gw': expected a http:// URL"
    # Both processes stop at start-up with that one line.
    env = child_env(redis_server, REACTIONS=SMS, SMS_GATEWAY_URL="ftp://gw")
    for argv in ([sys.executable, "-m", "pipeline.plan"], consumer_argv()):
        result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2
        assert result.stderr.splitlines()[-1].endswith(
            "error: SMS_GATEWAY_URL='ftp://gw': expected a http:// URL"
        )


def test_a_reaction_cannot_redeclare_a_setting() -> None:
    SMS_REACTION, SmsSettings = sms.REACTION, sms.SmsSettings

    @dataclass(frozen=True, slots=True)
    class Clash:
        url: str = setting("REDIS_URL", str, "", kind="URL", read_by="both", doc="x")

    with pytest.raises(ReactionError, match="setting REDIS_URL of reaction 'clash' is already"):
        Registry.of(Reaction("clash", settings=Clash))
    twin = Reaction("twin", settings=SmsSettings)
    with pytest.raises(ReactionError, match="SMS_GATEWAY_URL of reaction 'twin' is already"):
        Registry.of(SMS_REACTION, twin)
    with pytest.raises(ReactionError, match="settings must be a dataclass"):
        Reaction("plain", settings=dict)


def test_the_plan_follows_the_registry() -> None:
    plan = resolve(Settings.from_env({"REACTIONS": SMS, "JOB_TIMEOUT": "welcome_email=5"}))
    assert plan.queues == ("email", "marketing", "profile", "sms")
    assert plan.concurrency["sms"] == 16
    # Declared defaults (the SMS says 3 attempts, 10 s), overridden only where a setting says.
    assert plan.attempts["welcome_sms"] == 3
    assert plan.timeouts["welcome_sms"] == 10
    assert plan.timeouts["welcome_email"] == 5
    assert plan.timeouts["generate_profile"] == 30
    assert plan.registry.counters == (
        "users",
        "emails_sent",
        "marketing_list_updates",
        "profiles_generated",
        "sms_sent",
        "receiver_errors",
        "dead_letters_dropped",
    )
    built_in = "reactions.welcome_email,reactions.marketing,reactions.profile"
    with pytest.raises(SettingsError, match=r"^CONSUMER_QUEUES='sms': "):
        resolve(Settings.from_env({"REACTIONS": built_in, "CONSUMER_QUEUES": "sms"}))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("no.such.module", "cannot import reaction module 'no.such.module'"),
        ("tests.helpers", "module 'tests.helpers' declares no REACTION"),
        ("reactions,reactions.welcome_email", ""),  # loaded once: not a conflict
        ("bad name!", "expected comma-separated module names"),
    ],
)
def test_reactions_setting(value: str, problem: str) -> None:
    if not problem:
        loaded = resolve(Settings.from_env({"REACTIONS": value})).registry.reactions
        assert len(loaded) == len(REGISTRY.reactions)
        return
    with pytest.raises(SettingsError) as caught:
        resolve(Settings.from_env({"REACTIONS": value}))
    message = str(caught.value)
    assert message.startswith("REACTIONS=") and problem in message
    assert "\n" not in message


def test_conflicting_declarations_are_refused() -> None:
    twin = Reaction("twin", job_types=[WELCOME_EMAIL])
    with pytest.raises(ReactionError, match="'welcome_email' is declared by both"):
        Registry.of(WELCOME, twin)
    counter = JobType("other", queue="email", handler=send_welcome_email, counter="emails_sent")
    with pytest.raises(ReactionError, match="counter 'emails_sent' of job type 'other'"):
        Registry.of(WELCOME, Reaction("other", job_types=[counter]))
    with pytest.raises(ReactionError, match="counter 'users'"):
        Registry.of(Reaction("x", job_types=[JobType("x", "x", None, counter="users")]))
    with pytest.raises(ReactionError, match="job type 'Bad-Name'"):
        JobType("Bad-Name", queue="email", handler=None)
    with pytest.raises(ReactionError, match="attempts"):
        JobType("x", queue="email", handler=None, attempts=0)


def test_the_web_refuses_a_receiver_that_may_push_an_undeclared_type(
    make_settings: Any, redis_server: RedisServer
) -> None:
    settings = make_settings({"REACTIONS": "reactions,tests.reactions.undeclared"})
    with pytest.raises(ReactionError, match="may push job type 'welcome_emial'"):
        create_app(resolve(settings))
    env = child_env(redis_server, REACTIONS="reactions,tests.reactions.undeclared")
    check = subprocess.run(
        [sys.executable, "-m", "pipeline.plan"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 2
    lines = check.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: REACTIONS: receiver ")
    assert "enqueue_welcome_emial" in lines[0] and "'welcome_emial'" in lines[0]
    # hypercorn itself: the worker stops at import with that one line and no traceback (its
    # exit code is 0 whatever the worker's, pgjones/hypercorn#269: hence the check above).
    served = subprocess.run(
        [sys.executable, "-m", "hypercorn", "service:app", "--bind", f"127.0.0.1:{free_port()}"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert served.stderr.strip().splitlines() == lines


async def stray(sender: Any, **extra: Any) -> None:
    """Connected by hand, outside any reaction."""


def test_the_web_refuses_a_receiver_no_reaction_declares(settings: Settings) -> None:
    user_signed_up.connect(stray)
    try:
        with pytest.raises(ReactionError, match=r"test_reactions\.stray of 'user-signed-up' is"):
            create_app(resolve(settings))
    finally:
        user_signed_up.disconnect(stray)
    create_app(resolve(settings))  # and without it, the app starts


async def test_a_push_of_an_undeclared_type_fails_the_signup_loudly_with_nothing_written(
    make_settings: Any, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Its declaration passes the start-up check; its code pushes a misspelt type.
    settings = make_settings({"REACTIONS": "reactions,tests.reactions.misspelt"})
    async with create_app(resolve(settings)).test_app() as test_app:
        response = await test_app.test_client().post(
            "/signup", json={"username": "alice", "email": "a@example.com"}
        )
    assert response.status_code == 500
    assert (await response.get_json())["error"] == "internal"
    assert await redis.keys("*") == []
    assert "no reaction declares job type 'welcome_emial'" in caplog.text


def test_consumers_refuse_a_served_queue_whose_type_has_no_handler(
    redis_server: RedisServer,
) -> None:
    env = child_env(redis_server, REACTIONS="reactions,tests.reactions.unhandled")
    result = subprocess.run(
        consumer_argv(), env=env, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "python -m consumers: error: REACTIONS: queue 'crm' carries job type 'crm_export' "
        "(of 'unhandled'), which has no handler here"
    ]
    # Serving the other queues is fine: something else consumes 'crm'.
    unhandled = Settings.from_env({"REACTIONS": "reactions,tests.reactions.unhandled"})
    registry = resolve(unhandled).registry
    registry.check_handlers(("email", "marketing", "profile"), registry.handlers())
    with pytest.raises(ReactionError, match="queue 'email' carries job type 'welcome_email'"):
        registry.check_handlers(("email",), {})


def test_the_documented_example_is_the_tested_module() -> None:
    # docs/reactions.md ("Writing a reaction") prints tests/reactions/sms.py whole: what a
    # reader copies is what the test above runs end to end, and what ruff and mypy check.
    page = (ROOT / "docs" / "reactions.md").read_text()
    section = page.split("## Writing a reaction", 1)[1]
    printed = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert printed == (ROOT / "tests" / "reactions" / "sms.py").read_text()


def test_loading_the_reactions_imports_neither_quart_nor_the_app() -> None:
    # What a consumer process does: build the registry. Quart and the service package (which
    # builds the app on import) must stay out of it.
    probe = (
        "import sys; from pipeline.registry import load_registry; load_registry(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'quart', 'service'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr


class Badge(msgspec.Struct):
    """A badge a reaction awards."""

    label: str


async def test_a_reaction_user_field_is_served_with_the_user_and_documented(
    settings: Settings, redis: aioredis.Redis, keys: Keys
) -> None:
    badge = UserField("badge", Badge, description="Null until awarded.")
    registry = Registry.of(*load_registry().reactions, Reaction("badges", user_fields=[badge]))
    async with create_app(resolve(settings, registry)).test_app() as test_app:
        client = test_app.test_client()
        created = await client.post("/signup", json={"username": "alice", "email": "a@b.co"})
        user_id = (await created.get_json())["user_id"]
        first = await (await client.get(f"/users/{user_id}")).get_json()
        await redis.set(badge.key(keys, user_id), b'{"label": "early"}')
        second = await (await client.get(f"/users/{user_id}")).get_json()
        document = await (await client.get("/openapi.json")).get_json()
    assert (first["badge"], second["badge"]) == (None, {"label": "early"})
    assert badge.key(keys, user_id) == f"{keys.prefix}:badge:{user_id}"
    answer = document["paths"]["/users/{user_id}"]["get"]["responses"]["200"]
    schema = answer["content"]["application/json"]["schema"]
    assert {"profile", "badge"} <= set(schema["required"])
    assert schema["properties"]["badge"]["description"] == "Null until awarded."
    assert "Badge" in document["components"]["schemas"]
    with pytest.raises(ReactionError, match="user field 'profile' is declared twice"):
        Registry.of(*load_registry().reactions, Reaction("twin", user_fields=[PROFILE]))
