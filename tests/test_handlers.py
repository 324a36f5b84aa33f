"""Each handler's effect, against the real Redis and a real SMTP server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from pipeline.context import Context
from pipeline.errors import NotReplicatedError
from pipeline.jobs import new_job
from pipeline.keys import Keys
from pipeline.plan import resolve
from pipeline.queue import DirectQueue
from pipeline.registry import load_registry
from pipeline.settings import Settings
from pipeline.signals import user_signed_up
from reactions.marketing import LIST, add_to_marketing_list
from reactions.profile import PROFILE, build_profile, generate_profile
from reactions.welcome_email import EMAIL, send_welcome_email
from reactions.welcome_email.backends import ConsoleEmailBackend, SmtpEmailBackend, email_backend
from reactions.welcome_email.settings import EmailSettings
from tests.helpers import REGISTRY, SmtpSink, eventually


def context_for(
    redis: aioredis.Redis, keys: Keys, settings: Settings, context: type[Context] = Context
) -> Context:
    """A handler's context as a consumer of ``settings`` makes it (the reactions' settings
    resolved, the email backend opened)."""
    plan = resolve(settings)
    ctx = context(redis, settings, plan.reaction_settings)
    assert ctx.keys.prefix == keys.prefix
    ctx[EMAIL] = email_backend(ctx.settings_of(EmailSettings))
    return ctx


async def test_welcome_email_over_smtp(
    redis: aioredis.Redis, keys: Keys, make_settings: object, smtp_server: SmtpSink
) -> None:
    settings = make_settings({"SMTP_URL": smtp_server.url, "EMAIL_FROM": "Team <team@example.com>"})  # type: ignore[operator]
    ctx = context_for(redis, keys, settings)
    assert isinstance(ctx[EMAIL], SmtpEmailBackend)
    job = new_job(
        "welcome_email", {"user_id": "u1", "username": "zoë_42", "email": "zoe@example.com"}
    )
    await send_welcome_email(ctx, job)
    assert smtp_server.envelopes == [("team@example.com", ["zoe@example.com"])]
    message = smtp_server.messages[0]
    assert message["To"] == "zoe@example.com"
    assert "zoë_42" in message["Subject"]
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and "zoë_42" in text.get_content()
    assert html is not None and "<strong>zoë_42</strong>" in html.get_content()
    assert await redis.exists(keys.done(job.id)) == 1


async def test_welcome_email_to_the_console_without_smtp(
    redis: aioredis.Redis, keys: Keys, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = context_for(redis, keys, settings)
    assert isinstance(ctx[EMAIL], ConsoleEmailBackend)
    job = new_job("welcome_email", {"user_id": "u1", "username": "alice", "email": "a@example.com"})
    with caplog.at_level(logging.INFO):
        await send_welcome_email(ctx, job)
    # At INFO the address is masked and the body left out.
    assert "email to a***@example.com, subject 'Welcome, alice!'" in caplog.text
    assert "welcome email for user u1 sent to a***@example.com" in caplog.text
    assert "a@example.com" not in caplog.text
    assert "Hello alice" not in caplog.text
    assert await redis.exists(keys.done(job.id)) == 1

    caplog.clear()
    again = new_job("welcome_email", {"user_id": "u2", "username": "bo", "email": "b@example.com"})
    with caplog.at_level(logging.DEBUG, logger="reactions.welcome_email.backends"):
        await send_welcome_email(ctx, again)
    assert "the email to b@example.com:" in caplog.text
    assert "Hello bo" in caplog.text


async def test_smtp_failure_raises_and_marks_nothing(
    redis: aioredis.Redis, keys: Keys, make_settings: object
) -> None:
    from devtools.embedded_redis import free_port

    settings = make_settings({"SMTP_URL": f"smtp://127.0.0.1:{free_port()}", "SMTP_TIMEOUT": "1"})  # type: ignore[operator]
    job = new_job("welcome_email", {"user_id": "u1", "username": "alice", "email": "a@example.com"})
    with pytest.raises(Exception, match=r"(?i)connect"):
        await send_welcome_email(context_for(redis, keys, settings), job)
    assert await redis.exists(keys.done(job.id)) == 0


async def test_marketing_list(redis: aioredis.Redis, keys: Keys, settings: Settings) -> None:
    job = new_job(
        "marketing_signup",
        {"user_id": "u1", "email": "a@example.com", "signed_up_at": 1700000000.5},
    )
    await add_to_marketing_list(context_for(redis, keys, settings), job)
    assert await redis.zrange(keys.of(LIST), 0, -1, withscores=True) == [
        (b"a@example.com", 1700000000.5)
    ]


async def test_profile_is_written_and_served(
    redis: aioredis.Redis, keys: Keys, settings: Settings, client: object
) -> None:
    response = await client.post(
        "/signup", json={"username": "jo.van-dyke", "email": "Jo@Example.com"}
    )  # type: ignore[attr-defined]
    user_id = (await response.get_json())["user_id"]
    raw = await redis.rpop(keys.queue("profile"))
    from pipeline.jobs import decode

    await generate_profile(context_for(redis, keys, settings), decode(raw))
    user = await (await client.get(f"/users/{user_id}")).get_json()  # type: ignore[attr-defined]
    profile = user["profile"]
    assert profile["display_name"] == "Jo Van Dyke"
    assert profile["initials"] == "JV"
    assert profile["avatar_url"].startswith("https://www.gravatar.com/avatar/")
    datetime.fromisoformat(profile["created_at"])
    assert orjson.loads(await redis.get(PROFILE.key(keys, user_id))) == profile


def test_build_profile() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    profile = build_profile("alice_smith", " Alice@Example.com ", now)
    assert profile == {
        "display_name": "Alice Smith",
        "initials": "AS",
        # sha256 of the trimmed, lower-cased address
        "avatar_url": "https://www.gravatar.com/avatar/"
        "ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976?d=identicon&s=200",
        "created_at": "2026-01-02T03:04:05+00:00",
    }
    assert build_profile("bob", "b@example.com", now)["initials"] == "B"


async def test_receivers_push_directly_outside_a_request(redis: aioredis.Redis, keys: Keys) -> None:
    sink = DirectQueue(redis, keys, REGISTRY)
    for receiver in load_registry().receivers(user_signed_up):
        await receiver(
            None,
            jobs=sink,
            user_id="u1",
            username="alice",
            email="a@example.com",
            created_at=1.0,
            future_field="ignored",
        )
    for queue in ("email", "marketing", "profile"):
        assert await redis.llen(keys.queue(queue)) == 1


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ssl.SSLContext]:
    """A private CA (trustme) and a server certificate for 127.0.0.1 signed by it."""
    import trustme

    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    return str(ca_file), server_context


@pytest.mark.parametrize("scheme", ["smtp+starttls", "smtps"])
async def test_welcome_email_over_tls(
    redis: aioredis.Redis,
    keys: Keys,
    make_settings: object,
    certificate: tuple[str, ssl.SSLContext],
    scheme: str,
) -> None:
    from aiosmtpd.controller import Controller

    from devtools.embedded_redis import free_port

    cert, context = certificate
    sink = SmtpSink(port=free_port())
    if scheme == "smtps":
        controller = Controller(sink, hostname="127.0.0.1", port=sink.port, ssl_context=context)
    else:
        controller = Controller(
            sink, hostname="127.0.0.1", port=sink.port, tls_context=context, require_starttls=True
        )
    controller.start()
    try:
        url = f"{scheme}://127.0.0.1:{sink.port}"
        settings = make_settings({"SMTP_URL": url, "SMTP_CA_FILE": cert})  # type: ignore[operator]
        job = new_job(
            "welcome_email", {"user_id": "u1", "username": "tls", "email": "t@example.com"}
        )
        await send_welcome_email(context_for(redis, keys, settings), job)
        assert sink.recipients() == ["t@example.com"]
        # Without trusting the certificate, delivery fails rather than going out unverified.
        untrusted = make_settings({"SMTP_URL": url, "SMTP_TIMEOUT": "2"})  # type: ignore[operator]
        again = new_job("welcome_email", job.payload)
        with pytest.raises(Exception, match=r"(?i)certificate"):
            await send_welcome_email(context_for(redis, keys, untrusted), again)
        assert sink.recipients() == ["t@example.com"]
    finally:
        controller.stop()


async def test_each_effect_happens_once_per_job_id(
    redis: aioredis.Redis, keys: Keys, make_settings: object, smtp_server: SmtpSink
) -> None:
    settings = make_settings({"SMTP_URL": smtp_server.url})  # type: ignore[operator]
    ctx = context_for(redis, keys, settings)
    payload = {
        "user_id": "1" * 32,
        "username": "alice",
        "email": "a@example.com",
        "signed_up_at": 1,
    }
    jobs = [
        new_job("welcome_email", payload),
        new_job("marketing_signup", payload),
        new_job("generate_profile", payload),
    ]
    handlers = [send_welcome_email, add_to_marketing_list, generate_profile]
    for delivery in range(3):  # delivered three times: a retry, a recovery
        for handler, job in zip(handlers, jobs, strict=True):
            await handler(ctx, job)
        if delivery == 0:
            first_profile = await redis.get(PROFILE.key(keys, payload["user_id"]))
            first_deliveries = smtp_server.recipients()
            # A later delivery must not move the address on the list either.
            jobs[1] = dataclasses.replace(jobs[1], payload={**payload, "signed_up_at": 2})
    assert first_deliveries == smtp_server.recipients() == ["a@example.com"]
    assert await redis.zrange(keys.of(LIST), 0, -1, withscores=True) == [(b"a@example.com", 1)]
    assert await redis.get(PROFILE.key(keys, payload["user_id"])) == first_profile
    # Only the email, an effect outside Redis, needs a done-marker: the list and the profile
    # say themselves whether they are done, and keep no key per job.
    assert 0 < await redis.ttl(keys.done(jobs[0].id)) <= settings.idempotency_ttl
    assert await redis.exists(keys.done(jobs[1].id), keys.done(jobs[2].id)) == 0
    # Another job (another signup of the same address) is another effect.
    await send_welcome_email(ctx, new_job("welcome_email", payload))
    assert smtp_server.recipients() == ["a@example.com", "a@example.com"]


async def test_a_failed_email_is_not_marked_done(
    redis: aioredis.Redis, keys: Keys, make_settings: object
) -> None:
    from devtools.embedded_redis import free_port

    settings = make_settings({"SMTP_URL": f"smtp://127.0.0.1:{free_port()}", "SMTP_TIMEOUT": "1"})  # type: ignore[operator]
    job = new_job("welcome_email", {"user_id": "u1", "username": "alice", "email": "a@example.com"})
    with pytest.raises(Exception):  # noqa: B017 - whichever connection error the OS gives
        await send_welcome_email(context_for(redis, keys, settings), job)
    assert await redis.exists(keys.done(job.id)) == 0


async def test_headers_that_are_not_ascii_arrive_encoded_and_whole(
    redis: aioredis.Redis, keys: Keys, make_settings: object, smtp_server: SmtpSink
) -> None:
    settings = make_settings(
        {"SMTP_URL": smtp_server.url, "EMAIL_FROM": "Zoë Team <team@example.com>"}
    )  # type: ignore[operator]
    job = new_job(
        "welcome_email", {"user_id": "u1", "username": "Łukasz_ü", "email": "l@example.com"}
    )
    await send_welcome_email(context_for(redis, keys, settings), job)
    [message] = smtp_server.messages
    assert str(message["From"]) == "Zoë Team <team@example.com>"
    assert str(message["Subject"]) == "Welcome, Łukasz_ü!"
    text = message.get_body(("plain",))
    assert text is not None and "Hello Łukasz_ü," in text.get_content()


class FlakyMarkContext(Context):
    """Redis fails twice right after the SMTP server accepted (our code; Redis is real): the
    welcome email's done-marker write (the only write this test makes) fails before reaching
    Redis."""

    failures = 2

    def write(self, *command: Any) -> asyncio.Future[Any]:
        if self.failures:
            self.failures -= 1
            raise RedisConnectionError("Redis went away")
        return super().write(*command)


async def test_a_lost_done_marker_write_is_retried_not_sent_again(
    redis: aioredis.Redis, keys: Keys, make_settings: object, smtp_server: SmtpSink
) -> None:
    settings = make_settings({"SMTP_URL": smtp_server.url})  # type: ignore[operator]
    ctx = context_for(redis, keys, settings, FlakyMarkContext)
    job = new_job("welcome_email", {"user_id": "u1", "username": "alice", "email": "a@example.com"})
    await send_welcome_email(ctx, job)
    await send_welcome_email(ctx, job)  # redelivered: the marker made it
    assert isinstance(ctx, FlakyMarkContext) and ctx.failures == 0
    assert smtp_server.recipients() == ["a@example.com"]
    assert await redis.exists(keys.done(job.id)) == 1


async def test_a_mark_goes_with_the_settlement_unless_replicas_must_confirm_it(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """In a consumer a job's own mark is answered at once and handed to its settlement; with
    REDIS_MIN_REPLICAS it is a write of its own, which WAIT confirms (here no replica does)."""
    job_id = "a" * 32
    for replicas in (0, 1):
        ctx = Context(
            redis,
            dataclasses.replace(settings, redis_min_replicas=replicas, redis_replica_timeout=0.1),
        )
        ctx.settle_marks()  # as the consumer does

        async def run_job(ctx: Context) -> tuple[asyncio.Future[Any], str]:
            ctx.running(job_id)  # as the consumer does, in the job's task
            marked = ctx.mark_done(job_id)
            return marked, ctx.take_mark(job_id)

        marked, settled = await asyncio.create_task(run_job(ctx))
        if replicas == 0:
            assert marked.done() and settled == keys.done(job_id)
            assert ctx.take_mark(job_id) == ""  # taken once
            assert not await redis.exists(keys.done(job_id))  # the settlement writes it
        else:
            assert settled == ""
            with pytest.raises(NotReplicatedError):
                await marked
            assert await redis.exists(keys.done(job_id))  # written, not confirmed
            await redis.delete(keys.done(job_id))


@pytest.mark.parametrize(
    ("job_type", "payload", "problem"),
    [
        (
            "welcome_email",
            {"user_id": "1" * 32, "username": "eve", "email": "e@example.com\r\nBcc: x@evil.org"},
            "'email' holds a control or format character",
        ),
        (
            "welcome_email",
            {"user_id": "1" * 32, "username": "eve\nX-Evil: 1", "email": "e@example.com"},
            "'username' holds a control or format character",
        ),
        ("welcome_email", {"user_id": "1" * 32, "email": "e@example.com"}, "'username' is missing"),
        ("marketing_signup", {"email": "e\u202e@example.com"}, "'email' holds a control"),
        (
            "generate_profile",
            {"user_id": "../../x", "username": "eve", "email": "e@example.com"},
            "'user_id' is not 32 hexadecimal digits",
        ),
    ],
)
async def test_a_job_with_an_unsafe_payload_is_dead_lettered_at_once_and_nothing_sent(
    redis: aioredis.Redis,
    keys: Keys,
    make_settings: Any,
    smtp_server: SmtpSink,
    job_type: str,
    payload: dict[str, Any],
    problem: str,
) -> None:
    # A job pushed by something other than the web (which validates the same values) cannot
    # smuggle a header into an email, a line into a log or a path into a Redis key.
    from tests.test_runner import build_consumer

    settings = make_settings({"SMTP_URL": smtp_server.url, "FETCH_TIMEOUT": "0.2"})
    consumer, client = build_consumer(settings)
    await DirectQueue(redis, keys, REGISTRY).push(job_type, payload)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await eventually(lambda: _dead_letters(redis, keys), what="the dead letter")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()
    (entry,) = [orjson.loads(e) for e in await redis.lrange(keys.dead, 0, -1)]
    assert entry["reason"].startswith("invalid job: payload field ")
    assert problem in entry["reason"]
    assert entry["attempts"] == 1  # not retried
    assert smtp_server.messages == []
    assert await redis.keys(PROFILE.key(keys, "*")) == []
    assert await redis.zcard(keys.of(LIST)) == 0


async def _dead_letters(redis: aioredis.Redis, keys: Keys) -> bool:
    return bool(await redis.llen(keys.dead))
