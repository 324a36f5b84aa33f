from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import SettingsError
from pipeline.plan import Plan, resolve
from pipeline.settings import ClusterUrl, RateLimit, SentinelUrl, Settings
from reactions.welcome_email.settings import EmailSettings, SmtpConfig
from tests.helpers import REGISTRY


def plan_of(env: dict[str, str]) -> Plan:
    """What a process of ``env`` runs with."""
    return resolve(Settings.from_env(env))


def test_defaults_from_an_empty_environment() -> None:
    plan = plan_of({})
    settings = plan.settings
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.key_prefix == "signup"
    assert plan.settings_of(EmailSettings).smtp is None
    assert settings.max_body_bytes == 16 * 1024
    assert settings.body_timeout == 10.0
    assert settings.dead_letter_max == 10_000
    assert settings.shutdown_grace_period == 10.0
    # Every queue of the reactions (the built-in ones, and any other a module adds), each
    # job type with its declared attempts and timeout; the built-in ones declare 5 and 30 s.
    assert plan.queues == REGISTRY.queues
    assert dict(plan.concurrency) == dict.fromkeys(REGISTRY.queues, 16)
    assert settings.delivery_mode == "at-least-once"
    assert (settings.lease_ttl, settings.max_deliveries) == (5.0, 3)
    types = REGISTRY.job_types.values()
    assert dict(plan.attempts) == {t.name: t.attempts for t in types}
    assert dict(plan.timeouts) == {t.name: t.timeout for t in types}
    for name in ("welcome_email", "marketing_signup", "generate_profile"):
        assert (plan.attempts[name], plan.timeouts[name]) == (5, 30.0)
    assert (settings.retry_base_delay, settings.retry_max_delay) == (1.0, 300.0)
    assert settings.idempotency_ttl == 86_400
    assert settings.rate_limit == RateLimit(10, 60.0)
    assert (settings.rate_limit_failure, settings.trusted_proxies) == ("closed", ())


def test_delivery_settings_are_parsed() -> None:
    plan = plan_of(
        {
            "DELIVERY_MODE": "AT-MOST-ONCE",
            "LEASE_TTL": "2.5",
            "MAX_DELIVERIES": "5",
            "JOB_MAX_ATTEMPTS": "welcome_email=8, generate_profile=2",
            "JOB_TIMEOUT": "12",
            "RETRY_BASE_DELAY": "0.5",
            "RETRY_MAX_DELAY": "60",
            "IDEMPOTENCY_TTL": "3600",
        }
    )
    settings = plan.settings
    assert settings.delivery_mode == "at-most-once"
    assert (settings.lease_ttl, settings.max_deliveries) == (2.5, 5)
    declared = {t.name: t.attempts for t in REGISTRY.job_types.values()}
    assert dict(plan.attempts) == {
        **declared,
        "welcome_email": 8,
        "generate_profile": 2,
    }
    assert plan.attempts["marketing_signup"] == 5
    assert set(plan.timeouts.values()) == {12.0}
    assert (settings.retry_base_delay, settings.retry_max_delay) == (0.5, 60.0)
    assert settings.idempotency_ttl == 3600


def test_values_are_parsed() -> None:
    plan = plan_of(
        {
            "REDIS_URL": "redis://:secret@10.0.0.5:6380/2",
            "KEY_PREFIX": "{app}",
            "MAX_BODY_BYTES": "2048",
            "SHUTDOWN_GRACE_PERIOD": "2.5",
            "CONSUMER_QUEUES": "profile, email",
            "CONSUMER_CONCURRENCY": "email=8,profile=2",
            "LOG_LEVEL": "debug",
        }
    )
    settings = plan.settings
    assert settings.key_prefix == "{app}"
    assert settings.max_body_bytes == 2048
    assert settings.shutdown_grace_period == 2.5
    assert plan.queues == ("profile", "email")
    assert dict(plan.concurrency) == {"profile": 2, "email": 8}
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.local", SmtpConfig("mail.local", 25, "none")),
        (
            "smtp+starttls://u%40x:p%3Aw@mail.local",
            SmtpConfig("mail.local", 587, "starttls", "u@x", "p:w"),
        ),
        ("smtps://mail.local:2465", SmtpConfig("mail.local", 2465, "tls")),
    ],
)
def test_smtp_url(url: str, expected: SmtpConfig) -> None:
    assert plan_of({"SMTP_URL": url}).settings_of(EmailSettings).smtp == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "http://localhost"),
        ("REDIS_URL", "redis://localhost:99999"),
        ("REDIS_URL", "redis://localhost/abc"),
        ("REDIS_URL", "redis+sentinel://h1:26379"),
        ("REDIS_URL", "redis+sentinel://h1/signup/0"),
        ("REDIS_URL", "redis+sentinel://h1:26379,h2/signup/0"),
        ("REDIS_URL", "redis+sentinel://h1:70000/signup/0"),
        ("REDIS_URL", "redis+sentinel://h1:26379/signup/zero"),
        ("REDIS_URL", "redis+cluster://"),
        ("REDIS_URL", "redis+cluster://h1:7000,h2"),
        ("REDIS_URL", "redis+cluster://h1:7000/1"),
        ("REDIS_URL", "rediss+cluster://h1:0"),
        ("REDIS_MIN_REPLICAS", "-1"),
        ("REDIS_MIN_REPLICAS", "one"),
        ("REDIS_REPLICA_TIMEOUT", "0"),
        ("IDEMPOTENCY_KEY_TTL", "0"),
        ("KEY_PREFIX", "has space"),
        ("MAX_BODY_BYTES", "lots"),
        ("MAX_BODY_BYTES", "1"),
        ("SMTP_URL", "ftp://mail"),
        ("SMTP_URL", "smtp://"),
        ("EMAIL_FROM", "nobody"),
        ("SHUTDOWN_GRACE_PERIOD", "-1"),
        ("FETCH_TIMEOUT", "soon"),
        ("CONSUMER_QUEUES", "email,nosuchqueue"),
        ("CONSUMER_CONCURRENCY", "email=0"),
        ("CONSUMER_CONCURRENCY", "nosuchqueue=3"),
        ("LOG_LEVEL", "LOUD"),
        ("DELIVERY_MODE", "exactly-once"),
        ("LEASE_TTL", "0.1"),
        ("MAX_DELIVERIES", "0"),
        ("JOB_MAX_ATTEMPTS", "send_sms=3"),
        ("JOB_MAX_ATTEMPTS", "welcome_email=0"),
        ("JOB_TIMEOUT", "forever"),
        ("RETRY_BASE_DELAY", "-1"),
        ("IDEMPOTENCY_TTL", "1"),
        ("LOG_FORMAT", "xml"),
        ("ACCESS_LOG", "maybe"),
        ("METRICS_PORT", "0"),
        ("METRICS_PORT", "http"),
        ("METRICS_DIR", "/proc/1/no/such"),
        ("BODY_TIMEOUT", "0"),
        ("REDIS_CA_FILE", "/no/such/ca.pem"),
        ("DEAD_LETTER_MAX", "0"),
        ("BODY_TIMEOUT", "soon"),
        ("RATE_LIMIT", "10"),
        ("RATE_LIMIT", "ten/60"),
        ("RATE_LIMIT", "0/60"),
        ("RATE_LIMIT", "10/0"),
        ("RATE_LIMIT", "10/nan"),
        ("RATE_LIMIT_FAILURE", "ajar"),
        ("RESERVED_USERNAMES", ", ,"),
        ("RESERVED_USERNAMES", "x" * 65),
        ("TRUSTED_PROXIES", "10.0.0.0/8,proxy.local"),
        ("OPS_ALLOW", "everyone"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        plan_of({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}=")
    assert "\n" not in message
    assert caught.value.variable == name  # as data, for the CLI to name its flag


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"CONSUMER_QUEUES": "email,nosuchqueue"}, "CONSUMER_QUEUES"),
        ({"CONSUMER_CONCURRENCY": "nosuchqueue=2"}, "CONSUMER_CONCURRENCY"),
        ({"REACTIONS": "reactions.nowhere"}, "REACTIONS"),
        ({"REDIS_MIN_REPLICAS": "1", "REDIS_REPLICA_TIMEOUT": "9"}, "REDIS_REPLICA_TIMEOUT"),
    ],
)
def test_settings_that_do_not_fit_together_name_their_variable(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        plan_of(environ)
    assert caught.value.variable == variable
    assert str(caught.value) == f"{variable}={caught.value.value!r}: {caught.value.problem}"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://s1:26379,s2:26380,[::1]:26381/signup/2",
            SentinelUrl((("s1", 26379), ("s2", 26380), ("::1", 26381)), "signup", 2),
        ),
        ("redis+sentinel://s1:26379/mymaster", SentinelUrl((("s1", 26379),), "mymaster", 0)),
        (
            "redis+sentinel://app:p%40ss@s1:26379/signup/0",
            SentinelUrl((("s1", 26379),), "signup", 0, "app", "p@ss"),
        ),
    ],
)
def test_sentinel_url(url: str, expected: SentinelUrl) -> None:
    settings = Settings.from_env({"REDIS_URL": url})
    assert settings.sentinel == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+cluster://n1:7000,n2:7001,[::1]:7002",
            ClusterUrl((("n1", 7000), ("n2", 7001), ("::1", 7002)), tls=False),
        ),
        ("rediss+cluster://n1:7000/", ClusterUrl((("n1", 7000),), tls=True)),
        (
            "redis+cluster://app:p%40ss@n1:7000/0",
            ClusterUrl((("n1", 7000),), False, "app", "p@ss"),
        ),
    ],
)
def test_cluster_url(url: str, expected: ClusterUrl) -> None:
    settings = Settings.from_env({"REDIS_URL": url})
    assert settings.cluster == expected and settings.sentinel is None


@pytest.mark.parametrize(
    ("prefix", "keys_under"),
    [("signup", "{signup}"), ("{signup}", "{signup}"), ("app-{signup}", "app-{signup}")],
)
def test_on_a_cluster_the_prefix_is_the_keys_hash_tag(prefix: str, keys_under: str) -> None:
    settings = Settings.from_env({"REDIS_URL": "redis+cluster://n1:7000", "KEY_PREFIX": prefix})
    assert settings.key_prefix == keys_under
    assert Settings.from_env({"KEY_PREFIX": prefix}).key_prefix == prefix  # not elsewhere


@pytest.mark.parametrize("prefix", ["{}signup", "sign{up", "sign}up", "{sign{"])
def test_on_a_cluster_a_prefix_whose_keys_would_not_share_a_slot_is_refused(prefix: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"REDIS_URL": "redis+cluster://n1:7000", "KEY_PREFIX": prefix})
    assert caught.value.variable == "KEY_PREFIX" and "one slot" in caught.value.problem


def test_passwords_are_never_shown() -> None:
    plan = plan_of(
        {"REDIS_URL": "redis://user:hunter2@host:6379/0", "SMTP_URL": "smtp://u:hunter3@mail"}
    )
    for shown in (repr(plan.settings), repr(plan)):
        assert "hunter2" not in shown
        assert "hunter3" not in shown
        assert "***" in shown
    with pytest.raises(SettingsError) as caught:
        plan_of({"SMTP_URL": "smtp://u:hunter3@mail:notaport"})
    assert "hunter3" not in str(caught.value)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"REDIS_URL": "redis://user:hunter2@host:notaport"})
    assert "hunter2" not in str(caught.value)
    sentinel = Settings.from_env(
        {
            "REDIS_URL": "redis+sentinel://app:hunter4@s1:26379,s2:26379/signup/0",
            "REDIS_SENTINEL_PASSWORD": "hunter5",
        }
    )
    assert "hunter4" not in repr(sentinel) and "hunter5" not in repr(sentinel)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"REDIS_URL": "redis+sentinel://app:hunter4@s1:26379/"})
    assert "hunter4" not in str(caught.value)
    cluster = Settings.from_env({"REDIS_URL": "redis+cluster://app:hunter6@n1:7000,n2:7001"})
    assert "hunter6" not in repr(cluster) and "***" in repr(cluster)


def test_logging_and_metrics_settings() -> None:
    settings = Settings.from_env(
        {"LOG_FORMAT": "JSON", "ACCESS_LOG": "off", "METRICS_PORT": "9100", "METRICS_DIR": "m"}
    )
    assert (settings.log_format, settings.access_log, settings.metrics_port) == (
        "json",
        False,
        9100,
    )
    assert settings.metrics_dir == str(Path("m").resolve())


def test_rate_limit_settings() -> None:
    settings = Settings.from_env(
        {
            "RATE_LIMIT": "5/1.5",
            "RATE_LIMIT_FAILURE": "Open",
            "TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.4,,2001:db8::/32",
        }
    )
    assert settings.rate_limit == RateLimit(5, 1.5)
    assert settings.rate_limit_failure == "open"
    assert [str(n) for n in settings.trusted_proxies] == [
        "10.0.0.0/8",
        "192.168.1.4/32",
        "2001:db8::/32",
    ]
    assert Settings.from_env({"RATE_LIMIT": "off"}).rate_limit is None


def test_reserved_usernames_setting() -> None:
    assert "admin" in Settings.from_env({}).reserved_usernames
    assert Settings.from_env({"RESERVED_USERNAMES": "ceo, Boss"}).reserved_usernames == (
        "ceo",
        "Boss",
    )
    assert Settings.from_env({"RESERVED_USERNAMES": "none"}).reserved_usernames == ()
