"""One frozen settings object, read from the environment once per process and validated.

Nothing else in the project reads ``os.environ``. A bad value raises :class:`SettingsError`
whose message is one line naming the variable and the value.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Literal, TypeVar
from urllib.parse import unquote, urlsplit

from pipeline.errors import ReactionError, SettingsError
from pipeline.keys import NAME_RE
from pipeline.logs import LOG_FORMATS, LogFormat
from pipeline.registry import DEFAULT_REACTIONS, Registry, load_registry

T = TypeVar("T")
SmtpSecurity = Literal["none", "starttls", "tls"]
DeliveryMode = Literal["at-least-once", "at-most-once"]
DELIVERY_MODES: tuple[DeliveryMode, ...] = ("at-least-once", "at-most-once")
#: Jobs run at once per queue, unless CONSUMER_CONCURRENCY says otherwise.
DEFAULT_CONCURRENCY = 4
#: The key of a per-name setting's value for every name (``JOB_TIMEOUT=12``).
EVERY = "*"

_SMTP_SCHEMES: dict[str, tuple[SmtpSecurity, int]] = {
    "smtp": ("none", 25),
    "smtp+starttls": ("starttls", 587),
    "smtps": ("tls", 465),
}
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:{}-]{1,64}$")
RateLimitFailure = Literal["open", "closed"]
#: How many dead letters are kept by default (the newest); older ones are dropped and counted.
DEAD_LETTER_MAX = 10_000
#: Usernames nobody may take, so no one can pose as the service or its staff.
RESERVED_USERNAMES: tuple[str, ...] = (
    "abuse", "admin", "administrator", "api", "billing", "help", "hostmaster", "info",
    "mail", "moderator", "no-reply", "noreply", "null", "owner", "postmaster", "root",
    "security", "signup", "staff", "support", "system", "undefined", "webmaster", "www",
)  # fmt: skip
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` signups per ``period`` seconds from one client address, ``count`` of
    them at once (``RATE_LIMIT=count/period``)."""

    count: int
    period: float

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}"


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """``redis+sentinel://[user:password@]host1:port1,host2:port2/<service-name>/<db>``: the
    sentinels to ask for the primary of ``service``, and what to log in to it with."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


SENTINEL_SCHEME = "redis+sentinel"


def parse_sentinel_url(raw: str) -> SentinelUrl:
    """Parse a ``redis+sentinel://`` URL, or raise ValueError saying what is wrong."""
    scheme, sep, rest = raw.partition("://")
    if scheme != SENTINEL_SCHEME or not sep:
        raise ValueError(f"expected a {SENTINEL_SCHEME}:// URL")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected sentinels as host:port[,host:port...]")
        sentinels.append((host, int(port)))
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError("the URL names no service (redis+sentinel://host:port/<service>/<db>)")
    if db and not db.isdigit():
        raise ValueError("the database (after the service name) must be a number")
    return SentinelUrl(tuple(sentinels), unquote(service), int(db or 0), username, password)


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where welcome emails go: parsed from ``SMTP_URL``."""

    host: str
    port: int
    security: SmtpSecurity
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of both processes. See the README's configuration table."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_ca_file: str | None = None
    redis_sentinel_password: str | None = field(default=None, repr=False)
    redis_min_replicas: int = 0
    redis_replica_timeout: float = 0.5
    key_prefix: str = "signup"
    redis_connect_timeout: float = 0.5
    redis_socket_timeout: float = 1.0
    redis_pool_size: int = 32
    redis_pool_timeout: float = 0.5
    max_body_bytes: int = 16 * 1024
    body_timeout: float = 10.0
    smtp: SmtpConfig | None = None
    email_from: str = "Signup <no-reply@localhost>"
    smtp_timeout: float = 10.0
    smtp_ca_file: str | None = None
    reactions: tuple[str, ...] = DEFAULT_REACTIONS
    # The next four are filled from the registry of ``reactions`` (see __post_init__): every
    # queue, and a value per queue or job type (its declared default unless given).
    consumer_queues: tuple[str, ...] = ()
    consumer_concurrency: Mapping[str, int] = field(default_factory=dict)
    fetch_timeout: float = 1.0
    shutdown_grace_period: float = 10.0
    delivery_mode: DeliveryMode = "at-least-once"
    lease_ttl: float = 5.0
    max_deliveries: int = 3
    job_max_attempts: Mapping[str, int] = field(default_factory=dict)
    job_timeout: Mapping[str, float] = field(default_factory=dict)
    retry_base_delay: float = 1.0
    retry_max_delay: float = 300.0
    idempotency_ttl: int = 24 * 3600
    dead_letter_max: int = DEAD_LETTER_MAX
    log_level: str = "INFO"
    log_format: LogFormat = "text"
    access_log: bool = True
    metrics_dir: str = field(
        default_factory=lambda: os.path.join(tempfile.gettempdir(), "signup-metrics")
    )
    metrics_port: int | None = None
    rate_limit: RateLimit | None = RateLimit(10, 60.0)
    rate_limit_failure: RateLimitFailure = "closed"
    trusted_proxies: tuple[Network, ...] = ()
    reserved_usernames: tuple[str, ...] = RESERVED_USERNAMES
    idempotency_key_ttl: int = 24 * 3600

    def __post_init__(self) -> None:
        registry = self.registry
        queues = self.consumer_queues or registry.queues
        if not set(queues) <= set(registry.queues):
            raise SettingsError(
                f"CONSUMER_QUEUES={','.join(queues)!r}: expected a comma-separated list of "
                f"{', '.join(registry.queues)}"
            )
        types = registry.job_types.values()
        filled = {
            "consumer_queues": tuple(queues),
            "consumer_concurrency": _fill(
                "CONSUMER_CONCURRENCY",
                self.consumer_concurrency,
                {q: DEFAULT_CONCURRENCY for q in registry.queues},
            ),
            "job_max_attempts": _fill(
                "JOB_MAX_ATTEMPTS", self.job_max_attempts, {t.name: t.attempts for t in types}
            ),
            "job_timeout": _fill(
                "JOB_TIMEOUT", self.job_timeout, {t.name: t.timeout for t in types}
            ),
        }
        for name, value in filled.items():
            object.__setattr__(self, name, value)

    @property
    def registry(self) -> Registry:
        """The reactions of ``REACTIONS``: job types, queues, counters, handlers."""
        try:
            return load_registry(self.reactions)
        except ReactionError as exc:
            raise SettingsError(f"REACTIONS={','.join(self.reactions)!r}: {exc}") from None

    @property
    def sentinel(self) -> SentinelUrl | None:
        """The parsed ``redis+sentinel://`` URL, or None for a direct one."""
        if not self.redis_url.startswith(f"{SENTINEL_SCHEME}://"):
            return None
        return parse_sentinel_url(self.redis_url)

    def __repr__(self) -> str:
        # Never print a password: the URL is shown with its credentials masked.
        fields = ", ".join(
            f"{f.name}={redact_url(self.redis_url)!r}"
            if f.name == "redis_url"
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.repr
        )
        return f"Settings({fields})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (the process environment when None)."""
        env = os.environ if environ is None else environ
        defaults = cls()
        settings = cls(
            redis_url=_get(env, "REDIS_URL", _redis_url, defaults.redis_url),
            reactions=_get(env, "REACTIONS", parse_modules, defaults.reactions),
            redis_ca_file=_get(env, "REDIS_CA_FILE", _readable_file, None),
            redis_sentinel_password=_get(env, "REDIS_SENTINEL_PASSWORD", str, None),
            redis_min_replicas=_get(
                env, "REDIS_MIN_REPLICAS", _integer(0, 100), defaults.redis_min_replicas
            ),
            redis_replica_timeout=_get(
                env, "REDIS_REPLICA_TIMEOUT", _seconds(0.001, 60), defaults.redis_replica_timeout
            ),
            key_prefix=_get(env, "KEY_PREFIX", _prefix, defaults.key_prefix),
            redis_connect_timeout=_get(
                env, "REDIS_CONNECT_TIMEOUT", _seconds(0.01, 60), defaults.redis_connect_timeout
            ),
            redis_socket_timeout=_get(
                env, "REDIS_SOCKET_TIMEOUT", _seconds(0.01, 60), defaults.redis_socket_timeout
            ),
            redis_pool_size=_get(
                env, "REDIS_POOL_SIZE", _integer(1, 10_000), defaults.redis_pool_size
            ),
            redis_pool_timeout=_get(
                env, "REDIS_POOL_TIMEOUT", _seconds(0.0, 60), defaults.redis_pool_timeout
            ),
            max_body_bytes=_get(
                env, "MAX_BODY_BYTES", _integer(64, 16 * 1024 * 1024), defaults.max_body_bytes
            ),
            body_timeout=_get(env, "BODY_TIMEOUT", _seconds(0.1, 600), defaults.body_timeout),
            smtp=_get(env, "SMTP_URL", _smtp_url, None),
            email_from=_get(env, "EMAIL_FROM", _address, defaults.email_from),
            smtp_timeout=_get(env, "SMTP_TIMEOUT", _seconds(0.1, 300), defaults.smtp_timeout),
            smtp_ca_file=_get(env, "SMTP_CA_FILE", _readable_file, None),
            consumer_queues=_get(env, "CONSUMER_QUEUES", parse_queues, ()),
            consumer_concurrency=_get(env, "CONSUMER_CONCURRENCY", parse_concurrency, {}),
            fetch_timeout=_get(env, "FETCH_TIMEOUT", _seconds(0.1, 10), defaults.fetch_timeout),
            shutdown_grace_period=_get(
                env, "SHUTDOWN_GRACE_PERIOD", parse_grace_period, defaults.shutdown_grace_period
            ),
            delivery_mode=_get(env, "DELIVERY_MODE", parse_delivery_mode, defaults.delivery_mode),
            lease_ttl=_get(env, "LEASE_TTL", _seconds(1.0, 300), defaults.lease_ttl),
            max_deliveries=_get(env, "MAX_DELIVERIES", _integer(1, 1000), defaults.max_deliveries),
            job_max_attempts=_get(env, "JOB_MAX_ATTEMPTS", parse_max_attempts, {}),
            job_timeout=_get(env, "JOB_TIMEOUT", parse_job_timeout, {}),
            retry_base_delay=_get(
                env, "RETRY_BASE_DELAY", _seconds(0.001, 3600), defaults.retry_base_delay
            ),
            retry_max_delay=_get(
                env, "RETRY_MAX_DELAY", _seconds(0.001, 86_400), defaults.retry_max_delay
            ),
            idempotency_ttl=_get(
                env, "IDEMPOTENCY_TTL", _integer(60, 365 * 86_400), defaults.idempotency_ttl
            ),
            dead_letter_max=_get(
                env, "DEAD_LETTER_MAX", _integer(1, 10_000_000), defaults.dead_letter_max
            ),
            log_level=_get(env, "LOG_LEVEL", _log_level, defaults.log_level),
            log_format=_get(env, "LOG_FORMAT", _log_format, defaults.log_format),
            access_log=_get(env, "ACCESS_LOG", _boolean, defaults.access_log),
            metrics_dir=_get(env, "METRICS_DIR", _directory, defaults.metrics_dir),
            metrics_port=_get(env, "METRICS_PORT", parse_port, None),
            rate_limit=_get(env, "RATE_LIMIT", _rate_limit, defaults.rate_limit),
            rate_limit_failure=_get(
                env, "RATE_LIMIT_FAILURE", _rate_limit_failure, defaults.rate_limit_failure
            ),
            trusted_proxies=_get(env, "TRUSTED_PROXIES", _networks, defaults.trusted_proxies),
            reserved_usernames=_get(env, "RESERVED_USERNAMES", _names, defaults.reserved_usernames),
            idempotency_key_ttl=_get(
                env, "IDEMPOTENCY_KEY_TTL", _integer(1, 30 * 86_400), defaults.idempotency_key_ttl
            ),
        )
        if (
            settings.redis_min_replicas
            and settings.redis_replica_timeout >= settings.redis_socket_timeout
        ):
            raise SettingsError(
                f"REDIS_REPLICA_TIMEOUT={settings.redis_replica_timeout:g}: must be below "
                f"REDIS_SOCKET_TIMEOUT ({settings.redis_socket_timeout:g}), which bounds the "
                "wait for the replicas' answer"
            )
        return settings


def _get(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw.strip())
    except ValueError as exc:
        shown = redact_url(raw) if name in {"REDIS_URL", "SMTP_URL"} else raw
        if name == "REDIS_SENTINEL_PASSWORD":
            shown = "***"
        raise SettingsError(f"{name}={shown!r}: {exc}") from None


def redact_url(url: str) -> str:
    """``url`` with the password in it (if any) shown as ``***``."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not sep or not at or not colon:
        return url
    return f"{scheme}://{user}:***@{hosts}{slash}{path}"


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if not low <= value <= high:
            raise ValueError(f"expected seconds between {low:g} and {high:g}")
        return value

    return parse


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return value

    return parse


#: Parses ``SHUTDOWN_GRACE_PERIOD`` and the consumer's ``--grace-period``.
parse_grace_period = _seconds(0.0, 3600)
#: Parses ``METRICS_PORT`` and the consumer's ``--metrics-port``: a TCP port to listen on.
parse_port = _integer(1, 65535)


def _redis_url(raw: str) -> str:
    if raw.startswith(f"{SENTINEL_SCHEME}://"):
        parse_sentinel_url(raw)
        return raw
    parts = urlsplit(raw)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ValueError(f"expected a redis://, rediss://, unix:// or {SENTINEL_SCHEME}:// URL")
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError("the URL names no host")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("the URL's port is not a number from 0 to 65535") from None
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError("the database (the URL's path) must be a number")
    return raw


def _prefix(raw: str) -> str:
    if not _PREFIX_RE.match(raw):
        raise ValueError("expected 1 to 64 of letters, digits and _ . : { } -")
    return raw


def _smtp_url(raw: str) -> SmtpConfig:
    parts = urlsplit(raw)
    if parts.scheme not in _SMTP_SCHEMES:
        raise ValueError("expected smtp://, smtp+starttls:// or smtps:// [user:pass@]host[:port]")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    security, default_port = _SMTP_SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError("the URL's port is not a number from 0 to 65535") from None
    return SmtpConfig(
        host=parts.hostname,
        port=port,
        security=security,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def _readable_file(raw: str) -> str:
    if not os.path.isfile(raw) or not os.access(raw, os.R_OK):
        raise ValueError("no readable file at that path")
    return raw


def _address(raw: str) -> str:
    _, address = parseaddr(raw)
    if "@" not in address or any(ch in raw for ch in "\r\n"):
        raise ValueError("expected an email address such as 'Name <me@example.com>'")
    return raw


_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_modules(raw: str) -> tuple[str, ...]:
    """Parse ``REACTIONS``: comma-separated reaction modules or packages of them."""
    names = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    if not names or not all(_MODULE_RE.match(name) for name in names):
        raise ValueError("expected comma-separated module names, such as reactions,myapp.sms")
    return names


def parse_queues(raw: str) -> tuple[str, ...]:
    """Parse a comma-separated list of queue names (``email,profile``); whether a reaction
    declares them is checked against the registry (see :meth:`Settings.__post_init__`)."""
    names = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    if not names or not all(NAME_RE.fullmatch(name) for name in names):
        raise ValueError("expected a comma-separated list of queue names")
    return names


def _per_name(what: str, parse: Callable[[str], T]) -> Callable[[str], dict[str, T]]:
    """A parser of ``V`` (every name: the key :data:`EVERY`) or ``NAME=V,...``."""

    def parse_all(raw: str) -> dict[str, T]:
        if "=" not in raw:
            return {EVERY: parse(raw)}
        result = {}
        for part in raw.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or not NAME_RE.fullmatch(name):
                raise ValueError(f"expected V or {what}=V pairs")
            result[name] = parse(value.strip())
        return result

    return parse_all


def _fill(setting: str, given: Mapping[str, T], defaults: Mapping[str, T]) -> dict[str, T]:
    """``defaults`` overridden by ``given`` (per name, or :data:`EVERY` for all); a name the
    registry does not know is a :class:`SettingsError` naming ``setting``."""
    unknown = [name for name in given if name != EVERY and name not in defaults]
    if unknown:
        shown = ",".join(str(v) if k == EVERY else f"{k}={v}" for k, v in given.items())
        raise SettingsError(
            f"{setting}={shown!r}: {unknown[0]!r} is not one of {', '.join(defaults)}"
        )
    every = given.get(EVERY)
    return {
        name: given.get(name, every if every is not None else default)
        for name, default in defaults.items()
    }


#: ``8`` (every queue) or ``email=8,profile=2`` (the rest keep the default 4).
parse_concurrency = _per_name("QUEUE", _integer(1, 1000))
#: ``5`` (every job type) or ``welcome_email=8`` (the rest keep their declared attempts).
parse_max_attempts = _per_name("TYPE", _integer(1, 100))
#: Seconds a job may run: ``30`` or ``generate_profile=120`` (the rest keep their declared
#: timeout).
parse_job_timeout = _per_name("TYPE", _seconds(0.01, 86_400))


def parse_delivery_mode(raw: str) -> DeliveryMode:
    """``at-least-once`` or ``at-most-once``."""
    for mode in DELIVERY_MODES:
        if raw.lower() == mode:
            return mode
    raise ValueError(f"expected {' or '.join(DELIVERY_MODES)}")


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _log_format(raw: str) -> LogFormat:
    for name in LOG_FORMATS:
        if raw.lower() == name:
            return name
    raise ValueError(f"expected {' or '.join(LOG_FORMATS)}")


def _directory(raw: str) -> str:
    path = os.path.abspath(raw)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError("not a directory this process can create or write")
    return path


def _rate_limit(raw: str) -> RateLimit | None:
    if raw.lower() in {"off", "0"}:
        return None
    count, slash, period = raw.partition("/")
    try:
        limit = RateLimit(int(count), float(period))
    except ValueError:
        raise ValueError("expected COUNT/SECONDS, such as 10/60, or off") from None
    if not slash or not 1 <= limit.count <= 1_000_000 or not 1 <= limit.period <= 86_400:
        raise ValueError("expected COUNT/SECONDS with COUNT 1 to 1000000 and SECONDS 1 to 86400")
    return limit


def _rate_limit_failure(raw: str) -> RateLimitFailure:
    if raw.lower() not in {"open", "closed"}:
        raise ValueError("expected open or closed")
    return "open" if raw.lower() == "open" else "closed"


def _networks(raw: str) -> tuple[Network, ...]:
    found = []
    for item in raw.split(","):
        if not item.strip():
            continue
        try:
            found.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not an IP address or network") from None
    return tuple(found)


def _names(raw: str) -> tuple[str, ...]:
    if raw.lower() == "none":
        return ()
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    if not names or any(len(name) > 64 for name in names):
        raise ValueError("expected names separated by commas (each up to 64 characters), or none")
    return names


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLEANS.update({"0": False, "false": False, "no": False, "off": False})


def _boolean(raw: str) -> bool:
    try:
        return _BOOLEANS[raw.lower()]
    except KeyError:
        raise ValueError("expected true or false (1/0, yes/no, on/off)") from None


class _Probe:
    """A sender standing in for the app while its receivers are checked."""


def main() -> int:
    """``python -m pipeline.settings``: exit 0 if the environment's settings are valid and the
    reactions of ``REACTIONS`` fit together (every receiver declared, with job types some
    reaction declares), else print one line saying what is wrong and exit 2. The Procfile
    runs it before hypercorn, whose exit code hides a worker's failed start
    (pgjones/hypercorn#269)."""
    try:
        registry = Settings.from_env().registry
        probe = _Probe()
        registry.connect(probe)
        registry.check_receivers(probe)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ReactionError as exc:
        print(f"error: REACTIONS: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
