"""Reactions: one module each, collected in a registry both processes derive everything from,
and checked at start-up."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import redis.asyncio as aioredis

from devtools.embedded_redis import free_port
from pipeline.errors import ReactionError, SettingsError
from pipeline.keys import Keys
from pipeline.registry import JobType, Reaction, Registry
from pipeline.settings import Settings
from pipeline.signals import user_signed_up
from reactions.welcome_email import REACTION as WELCOME
from reactions.welcome_email import WELCOME_EMAIL, send_welcome_email
from service.app import create_app
from tests.helpers import RedisServer, eventually, parse_metrics
from tests.processes import ROOT, child_env, consumer_argv, http, request, web

SMS = "reactions,tests.reactions.sms"


async def test_a_fourth_reaction_runs_end_to_end_from_one_module(
    spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, keys: Keys
) -> None:
    # tests/reactions/sms.py is the whole reaction: receiver, job type on a new queue,
    # handler, counter, resource hooks. Nothing else names it but REACTIONS.
    env = child_env(redis_server, REACTIONS=SMS)
    metrics_port = free_port()
    worker = spawn(consumer_argv("--metrics-port", str(metrics_port)), env)
    await eventually(lambda: redis.get(keys.of("sms", "gateway")), what="the gateway to open")
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
    assert await redis.lrange(keys.of("sms", "outbox"), 0, -1) == [
        f"{created['user_id']}: Welcome, alice!".encode()
    ]
    answer = document["paths"]["/stats"]["get"]["responses"]["200"]
    stats_schema = answer["content"]["application/json"]["schema"]
    assert {"sms_sent", "emails_sent"} <= set(stats_schema["required"])
    assert "sms" in stats_schema["properties"]["queues"]["description"]
    # The consumer's metrics label the new type and queue like the others.
    _, _, text = await request(metrics_port, "GET", "/metrics")
    metrics = parse_metrics(text.decode())
    assert metrics[("signup_jobs_total", (("outcome", "succeeded"), ("type", "welcome_sms")))] == 1
    assert ("signup_job_queue_wait_seconds_count", (("queue", "sms"),)) in metrics
    assert await worker.stop() == 0
    assert await redis.get(keys.of("sms", "gateway")) == b"closed"  # the shutdown hook ran
    assert "smsx16" in worker.output()  # served by default, with the default concurrency


def test_settings_follow_the_registry() -> None:
    settings = Settings.from_env({"REACTIONS": SMS, "JOB_TIMEOUT": "welcome_email=5"})
    assert settings.consumer_queues == ("email", "marketing", "profile", "sms")
    assert settings.consumer_concurrency["sms"] == 16
    # Declared defaults (the SMS says 3 attempts, 10 s), overridden only where a setting says.
    assert settings.job_max_attempts["welcome_sms"] == 3
    assert settings.job_timeout["welcome_sms"] == 10
    assert settings.job_timeout["welcome_email"] == 5
    assert settings.job_timeout["generate_profile"] == 30
    assert settings.registry.counters == (
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
        Settings.from_env({"REACTIONS": built_in, "CONSUMER_QUEUES": "sms"})  # no SMS reaction


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
        assert len(Settings.from_env({"REACTIONS": value}).registry.reactions) == 3
        return
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"REACTIONS": value})
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
        create_app(settings)
    env = child_env(redis_server, REACTIONS="reactions,tests.reactions.undeclared")
    check = subprocess.run(
        [sys.executable, "-m", "pipeline.settings"],
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
            create_app(settings)
    finally:
        user_signed_up.disconnect(stray)
    create_app(settings)  # and without it, the app starts


async def test_a_push_of_an_undeclared_type_fails_the_signup_loudly_with_nothing_written(
    make_settings: Any, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Its declaration passes the start-up check; its code pushes a misspelt type.
    settings = make_settings({"REACTIONS": "reactions,tests.reactions.misspelt"})
    async with create_app(settings).test_app() as test_app:
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
    registry = Settings.from_env({"REACTIONS": "reactions,tests.reactions.unhandled"}).registry
    registry.check_handlers(("email", "marketing", "profile"), registry.handlers())
    with pytest.raises(ReactionError, match="queue 'email' carries job type 'welcome_email'"):
        registry.check_handlers(("email",), {})


def test_the_readme_example_is_one_complete_reaction_module() -> None:
    # "Writing a reaction" shows the SMS reaction whole: it must at least be valid Python that
    # declares a REACTION with a job type, a receiver and both hooks, as tests/reactions/sms.py
    # (which runs end to end above) does.
    import ast
    import importlib

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Writing a reaction", 1)[1]
    source = section.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(source)
    assigned = {
        target.id
        for node in tree.body
        if isinstance(node, ast.AnnAssign | ast.Assign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    assert {"REACTION", "WELCOME_SMS", "GATEWAY"} <= assigned
    functions = {n.name for n in tree.body if isinstance(n, ast.AsyncFunctionDef)}
    assert functions == {"send_welcome_sms", "enqueue_welcome_sms", "open_gateway", "close_gateway"}
    imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module]
    # Both processes import a reaction: never Quart or the app.
    assert not [n.module for n in imports if str(n.module).startswith(("quart", "service"))]
    for node in imports:
        if node.module in {"__future__", "myapp.sms_gateway"}:
            continue
        module = importlib.import_module(str(node.module))
        for alias in node.names:  # every name it takes from this project exists
            assert hasattr(module, alias.name), (node.module, alias.name)


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
