"""The settings both processes share: one frozen value, read from the environment once per
process and validated.

Nothing else in the project reads ``os.environ``. A bad value raises :class:`SettingsError`
whose message is one line naming the variable and the value. Reading them imports no
reaction: what follows from ``REACTIONS`` (the registry, served queues, per-type attempts
and timeouts, the reactions' own settings) is worked out by :func:`pipeline.plan.resolve`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, TypeVar
from urllib.parse import unquote, urlsplit

from pipeline.config import (
    Setting,
    boolean,
    declared,
    host_port,
    integer,
    masked,
    parse_env,
    readable_file,
    redact_url,
    seconds,
    setting,
)
from pipeline.errors import SettingsError
from pipeline.keys import NAME_RE
from pipeline.logs import LOG_FORMATS, LogFormat

T = TypeVar("T")
DeliveryMode = Literal["at-least-once", "at-most-once"]
RateLimitFailure = Literal["open", "closed"]
DELIVERY_MODES: tuple[DeliveryMode, ...] = ("at-least-once", "at-most-once")
#: Jobs run at once per queue, unless CONSUMER_CONCURRENCY says otherwise. It is also the
#: most a fetch loop takes in one round trip, and Redis's cost per job is mostly its share of
#: the take's and the effects' round trips: from 4 to 16, a backlog drained cost Redis 42%
#: less per signup and went 55% faster (docs, Performance).
DEFAULT_CONCURRENCY = 16
#: What ``REACTIONS`` names by default: every module of this package.
DEFAULT_REACTIONS: tuple[str, ...] = ("reactions",)
#: The key of a per-name setting's value for every name (``JOB_TIMEOUT=12``).
EVERY = "*"

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:{}-]{1,64}$")
#: How many dead letters are kept by default (the newest); older ones are dropped and counted.
DEAD_LETTER_MAX = 10_000
#: How long a job's done-marker is kept by default (``IDEMPOTENCY_TTL``), in seconds.
IDEMPOTENCY_TTL = 24 * 3600
#: Usernames nobody may take, so no one can pose as the service or its staff.
RESERVED_USERNAMES: tuple[str, ...] = (
    "abuse", "admin", "administrator", "api", "billing", "help", "hostmaster", "info",
    "mail", "moderator", "no-reply", "noreply", "null", "owner", "postmaster", "root",
    "security", "signup", "staff", "support", "system", "undefined", "webmaster", "www",
)  # fmt: skip
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Who may read ``/stats`` and ``/metrics`` unless OPS_ALLOW says otherwise: this host and
#: the private ranges (a scraper or an operator inside the network), not the internet.
OPS_NETWORKS: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` signups per ``period`` seconds from one client address, ``count`` of
    them at once (``RATE_LIMIT=count/period``)."""

    count: int
    period: float

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}"


def parse_rate_limit(raw: str) -> RateLimit | None:
    """``RATE_LIMIT``: ``COUNT/SECONDS``, or ``off``."""
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


def parse_rate_limit_failure(raw: str) -> RateLimitFailure:
    """``RATE_LIMIT_FAILURE``: ``open`` or ``closed``."""
    if raw.lower() not in {"open", "closed"}:
        raise ValueError("expected open or closed")
    return "open" if raw.lower() == "open" else "closed"


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
    username, password, sentinels = _nodes(netloc, "sentinels")
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError("the URL names no service (redis+sentinel://host:port/<service>/<db>)")
    if db and not db.isdigit():
        raise ValueError("the database (after the service name) must be a number")
    return SentinelUrl(sentinels, unquote(service), int(db or 0), username, password)


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    """``redis+cluster://[user:password@]host1:port1,host2:port2`` (``rediss+cluster://``
    for TLS): nodes of a Redis Cluster to ask which primary owns the keys' slot (any
    reachable ones; the rest are learnt from them), and what to log in with."""

    nodes: tuple[tuple[str, int], ...]
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)


CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")


def parse_cluster_url(raw: str) -> ClusterUrl:
    """Parse a ``redis+cluster://`` or ``rediss+cluster://`` URL, or raise ValueError saying
    what is wrong."""
    scheme, sep, rest = raw.partition("://")
    if scheme not in CLUSTER_SCHEMES or not sep:
        raise ValueError("expected a redis+cluster:// or rediss+cluster:// URL")
    netloc, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError("a cluster has only database 0 (leave the URL's path empty)")
    username, password, nodes = _nodes(netloc, "cluster nodes")
    return ClusterUrl(nodes, scheme == "rediss+cluster", username, password)


def _nodes(netloc: str, what: str) -> tuple[str | None, str | None, tuple[tuple[str, int], ...]]:
    """``[user:password@]host1:port1,host2:port2``: the credentials and the (host, port)s."""
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    found = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected {what} as host:port[,host:port...]")
        found.append((host, int(port)))
    return username, password, tuple(found)


def hash_tag(key: str) -> tuple[int, int] | None:
    """Where the hash tag of ``key`` is, as Redis Cluster finds it (the text between the first
    ``{`` and the first ``}`` after it, if not empty): (start, end) of that text; None if the
    whole key is hashed."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return (start + 1, end) if end > start + 1 else None


def cluster_prefix(prefix: str) -> str:
    """The prefix every key takes on a cluster, so that they all hash to one slot: ``prefix``
    as its own hash tag (``signup`` -> ``{signup}``), or as given when it has a tag that ends
    within it. ValueError if it has braces but no such tag."""
    if "{" not in prefix and "}" not in prefix:
        return f"{{{prefix}}}"
    tag = hash_tag(prefix + ":")
    if tag is None or tag[1] >= len(prefix):
        raise ValueError(
            "with a cluster URL every key must hash to one slot: give the prefix a non-empty "
            "hash tag that ends within it ({signup}, app-{signup}) or no braces at all"
        )
    return prefix


#: Parses ``SHUTDOWN_GRACE_PERIOD`` and the consumer's ``--grace-period``.
parse_grace_period = seconds(0.0, 3600)
#: Parses ``METRICS_PORT`` and the consumer's ``--metrics-port``: a TCP port to listen on.
parse_port = integer(1, 65535)


def _redis_url(raw: str) -> str:
    if raw.startswith(f"{SENTINEL_SCHEME}://"):
        parse_sentinel_url(raw)
        return raw
    if raw.startswith(tuple(f"{scheme}://" for scheme in CLUSTER_SCHEMES)):
        parse_cluster_url(raw)
        return raw
    parts = urlsplit(raw)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ValueError(
            f"expected a redis://, rediss://, unix://, {SENTINEL_SCHEME}:// or redis+cluster:// URL"
        )
    if parts.scheme != "unix":
        host_port(parts)
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError("the database (the URL's path) must be a number")
    return raw


def _prefix(raw: str) -> str:
    if not _PREFIX_RE.match(raw):
        raise ValueError("expected 1 to 64 of letters, digits and _ . : { } -")
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
    declares them is checked against the registry (by :func:`pipeline.plan.resolve`)."""
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


#: ``8`` (every queue) or ``email=8,profile=2`` (the rest keep DEFAULT_CONCURRENCY).
parse_concurrency = _per_name("QUEUE", integer(1, 1000))
#: ``5`` (every job type) or ``TYPE=8,...`` (the rest keep their declared attempts).
parse_max_attempts = _per_name("TYPE", integer(1, 100))
#: Seconds a job may run: ``30`` or ``TYPE=120,...`` (the rest keep their declared
#: timeout).
parse_job_timeout = _per_name("TYPE", seconds(0.01, 86_400))


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


def _host(raw: str) -> str:
    try:
        ipaddress.ip_address(raw.strip("[]"))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", raw):
            raise ValueError("expected an IP address or a host name") from None
    return raw.strip("[]")


def _user(raw: str) -> str:
    if not re.fullmatch(r"[!-9;-~]{1,64}", raw):  # printable ASCII but ':' and spaces
        raise ValueError("expected 1 to 64 printable ASCII characters, without ':' or spaces")
    return raw


def _password(raw: str) -> str:
    if len(raw) < 12 or not raw.isprintable():
        raise ValueError("expected at least 12 printable characters")
    return raw


def _names(raw: str) -> tuple[str, ...]:
    if raw.lower() == "none":
        return ()
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    if not names or any(len(name) > 64 for name in names):
        raise ValueError("expected names separated by commas (each up to 64 characters), or none")
    return names


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of both processes, each declared once, here (see :func:`setting`)."""

    redis_url: str = setting(
        "REDIS_URL",
        _redis_url,
        "redis://127.0.0.1:6379/0",
        kind="URL",
        read_by="both",
        doc="Redis (`redis://`, `rediss://`, `unix://`, `redis+sentinel://[user:password@]"
        "host1:port1,host2:port2/<service-name>/<db>`, or `redis+cluster://[user:password@]"
        "host1:port1,host2:port2` (`rediss+cluster://` with TLS) for Redis Cluster; user and "
        "password in the URL)",
        show=redact_url,
    )
    redis_ca_file: str | None = setting(
        "REDIS_CA_FILE",
        readable_file,
        None,
        kind="path",
        read_by="both",
        doc="for `rediss://` and `rediss+cluster://`: CA bundle to verify Redis's certificate "
        "(and host name) with; unset: the system's CAs",
    )
    redis_sentinel_password: str | None = setting(
        "REDIS_SENTINEL_PASSWORD",
        str,
        None,
        kind="string",
        read_by="both",
        show=masked,
        doc="for `redis+sentinel://`: the password the sentinels themselves require (not "
        "Redis's, which is in the URL)",
    )
    redis_min_replicas: int = setting(
        "REDIS_MIN_REPLICAS",
        integer(0, 100),
        0,
        kind="integer",
        read_by="both",
        doc="replicas that must confirm a write (`WAIT`, in the same round trip) before it "
        "counts. Web: a signup before its 201; fewer in time is a 503 `not_replicated`. "
        "Consumers: a job's effect before the job is acknowledged; fewer puts the job back. "
        "`0`: no wait (see High availability)",
    )
    redis_replica_timeout: float = setting(
        "REDIS_REPLICA_TIMEOUT",
        seconds(0.001, 60),
        0.5,
        kind="seconds",
        read_by="both",
        doc="how long a write waits for `REDIS_MIN_REPLICAS` replicas; must be below "
        "`REDIS_SOCKET_TIMEOUT`",
    )
    key_prefix: str = setting(
        "KEY_PREFIX",
        _prefix,
        "signup",
        kind="string",
        read_by="both",
        doc="prefix of every Redis key (letters, digits, `_ . : { } -`); on Redis Cluster "
        "it is the keys' hash tag (`signup` becomes `{signup}`), so all of them share a slot",
    )
    redis_connect_timeout: float = setting(
        "REDIS_CONNECT_TIMEOUT",
        seconds(0.01, 60),
        0.5,
        kind="seconds",
        read_by="web",
        doc="seconds to connect to Redis",
    )
    redis_socket_timeout: float = setting(
        "REDIS_SOCKET_TIMEOUT",
        seconds(0.01, 60),
        1.0,
        kind="seconds",
        read_by="web",
        doc="seconds to wait for a Redis reply; together these bound a 503 to ~1 s",
        shown="1.0",
    )
    redis_pool_size: int = setting(
        "REDIS_POOL_SIZE",
        integer(1, 10_000),
        32,
        kind="integer",
        read_by="web",
        doc="Redis connections per hypercorn worker",
    )
    redis_pool_timeout: float = setting(
        "REDIS_POOL_TIMEOUT",
        seconds(0.0, 60),
        0.5,
        kind="seconds",
        read_by="web",
        doc="seconds a request waits for a free connection before a 503",
    )
    max_body_bytes: int = setting(
        "MAX_BODY_BYTES",
        integer(64, 16 * 1024 * 1024),
        16 * 1024,
        kind="integer (bytes)",
        read_by="web",
        doc="largest request body; larger is a 413, refused as soon as the `Content-Length` "
        "or the bytes received pass it",
    )
    body_timeout: float = setting(
        "BODY_TIMEOUT",
        seconds(0.1, 600),
        10.0,
        kind="seconds",
        read_by="web",
        doc="seconds a request's whole body may take to arrive once the handler reads it; "
        "slower is a 408 and the connection is closed",
    )
    reactions: tuple[str, ...] = setting(
        "REACTIONS",
        parse_modules,
        DEFAULT_REACTIONS,
        kind="list of modules",
        read_by="both",
        doc="reaction modules to load, or packages of them (every public module): "
        "`reactions,myapp.sms`; both processes must name the same (see Writing a reaction)",
    )
    # The next four are as given: empty means every queue, or each type's declared value;
    # :func:`pipeline.plan.resolve` checks the names against the reactions and fills the rest.
    consumer_queues: tuple[str, ...] = setting(
        "CONSUMER_QUEUES",
        parse_queues,
        (),
        kind="list of queues",
        read_by="consumers",
        shown="every queue",
        flag="--queues",
        doc="queues a consumer process serves (see Reactions for the queues)",
    )
    consumer_concurrency: Mapping[str, int] = setting(
        "CONSUMER_CONCURRENCY",
        parse_concurrency,
        None,
        factory=dict,
        kind="integer, or per queue",
        read_by="consumers",
        shown=str(DEFAULT_CONCURRENCY),
        flag="--concurrency",
        doc=f"jobs run at once per queue: `N`, or `email=8,profile=2` (others keep "
        f"{DEFAULT_CONCURRENCY})",
    )
    fetch_timeout: float = setting(
        "FETCH_TIMEOUT",
        seconds(0.1, 10),
        1.0,
        kind="seconds",
        read_by="consumers",
        shown="1.0",
        doc="seconds a fetch (BLMOVE / BRPOP) blocks; also the most a stop waits for fetch loops",
    )
    shutdown_grace_period: float = setting(
        "SHUTDOWN_GRACE_PERIOD",
        parse_grace_period,
        10.0,
        kind="seconds",
        read_by="consumers",
        flag="--grace-period",
        doc="seconds in-flight jobs get after SIGTERM/SIGINT",
    )
    delivery_mode: DeliveryMode = setting(
        "DELIVERY_MODE",
        parse_delivery_mode,
        "at-least-once",
        kind="choice",
        read_by="consumers",
        flag="--delivery",
        doc="`at-least-once` or `at-most-once`; see Delivery guarantees",
    )
    lease_ttl: float = setting(
        "LEASE_TTL",
        seconds(1.0, 300),
        5.0,
        kind="seconds",
        read_by="consumers",
        doc="seconds a consumer's lease lives unless renewed (renewed every third of it); a "
        "killed consumer's jobs are recovered this long after its last renewal, plus at most "
        "1 s",
    )
    max_deliveries: int = setting(
        "MAX_DELIVERIES",
        integer(1, 1000),
        3,
        kind="integer",
        read_by="consumers",
        doc="a job recovered from a dead consumer this many times is dead-lettered (a poison pill)",
    )
    job_max_attempts: Mapping[str, int] = setting(
        "JOB_MAX_ATTEMPTS",
        parse_max_attempts,
        None,
        factory=dict,
        kind="integer, or per type",
        read_by="consumers",
        shown="as declared",
        doc="attempts before a failing job is dead-lettered: `N` for every type, or "
        "`TYPE=N,...` per job type (others keep their reaction's declared "
        "attempts: see Reactions)",
    )
    job_timeout: Mapping[str, float] = setting(
        "JOB_TIMEOUT",
        parse_job_timeout,
        None,
        factory=dict,
        kind="seconds, or per type",
        read_by="consumers",
        shown="as declared",
        doc="seconds a job may run before it counts as a failed attempt: `S`, or per type "
        "like `JOB_MAX_ATTEMPTS`. One watchdog task per consumer enforces it, within 0.1 s",
    )
    retry_base_delay: float = setting(
        "RETRY_BASE_DELAY",
        seconds(0.001, 3600),
        1.0,
        kind="seconds",
        read_by="consumers",
        doc="seconds before the first retry; doubling each attempt, with jitter: attempt *n* "
        "waits between half and all of `base * 2^(n-1)`",
    )
    retry_max_delay: float = setting(
        "RETRY_MAX_DELAY",
        seconds(0.001, 86_400),
        300.0,
        kind="seconds",
        read_by="consumers",
        doc="cap of the retry delay, seconds",
    )
    idempotency_ttl: int = setting(
        "IDEMPOTENCY_TTL",
        integer(60, 365 * 86_400),
        IDEMPOTENCY_TTL,
        kind="integer (seconds)",
        read_by="consumers",
        doc="seconds a job's done-marker (an effect outside Redis: the welcome email) is "
        "kept; a redelivery later than this would repeat the effect",
    )
    dead_letter_max: int = setting(
        "DEAD_LETTER_MAX",
        integer(1, 10_000_000),
        DEAD_LETTER_MAX,
        kind="integer",
        read_by="consumers",
        doc="dead letters kept, the newest; each one past it drops the oldest, counted in "
        "`/stats` as `dead_letters_dropped`",
    )
    log_level: str = setting(
        "LOG_LEVEL",
        _log_level,
        "INFO",
        kind="choice",
        read_by="both",
        doc="`DEBUG`, `INFO`, `WARNING`, `ERROR`",
    )
    log_format: LogFormat = setting(
        "LOG_FORMAT",
        _log_format,
        "text",
        kind="choice",
        read_by="both",
        doc="`text` (human-readable lines) or `json` (one JSON object per line)",
    )
    access_log: bool = setting(
        "ACCESS_LOG",
        boolean,
        True,
        kind="boolean",
        read_by="web",
        doc="one INFO line per request (`service.access`) with its request id; `true`/`false` "
        "(also `1`/`0`, `yes`/`no`, `on`/`off`)",
    )
    metrics_dir: str = setting(
        "METRICS_DIR",
        _directory,
        None,
        kind="path",
        read_by="web",
        factory=lambda: os.path.join(tempfile.gettempdir(), "signup-metrics"),
        shown="<temp dir>/signup-metrics",
        doc="where hypercorn's workers keep their metrics (prometheus_client multiprocess "
        "mode), one subdirectory per hypercorn master",
    )
    metrics_port: int | None = setting(
        "METRICS_PORT",
        parse_port,
        None,
        kind="integer",
        read_by="consumers",
        flag="--metrics-port",
        doc="serve Prometheus metrics on this port at `/metrics`; unset: off",
    )
    dashboard_bind: str = setting(
        "DASHBOARD_BIND",
        _host,
        "127.0.0.1",
        kind="address",
        read_by="dashboard",
        doc="the address the dashboard (`python -m consumers dashboard`) listens on; anything "
        "but loopback needs `DASHBOARD_PASSWORD`",
    )
    dashboard_port: int = setting(
        "DASHBOARD_PORT",
        parse_port,
        9181,
        kind="integer",
        read_by="dashboard",
        doc="the dashboard's port",
    )
    dashboard_user: str = setting(
        "DASHBOARD_USER",
        _user,
        "admin",
        kind="string",
        read_by="dashboard",
        doc="the dashboard's user name (HTTP Basic auth)",
    )
    dashboard_password: str | None = setting(
        "DASHBOARD_PASSWORD",
        _password,
        None,
        kind="string",
        read_by="dashboard",
        show=masked,
        doc="the dashboard's password (HTTP Basic auth, at least 12 characters). Unset: the "
        "dashboard runs open, and only on a loopback `DASHBOARD_BIND`",
    )
    rate_limit: RateLimit | None = setting(
        "RATE_LIMIT",
        parse_rate_limit,
        RateLimit(10, 60.0),
        kind="`COUNT/SECONDS`, or `off`",
        read_by="web",
        doc="signups per client address: `COUNT` at once, then one every `SECONDS/COUNT`; "
        "more is a 429 with `Retry-After`. Checked inside the signup's commit script (see "
        "Security)",
    )
    rate_limit_failure: RateLimitFailure = setting(
        "RATE_LIMIT_FAILURE",
        parse_rate_limit_failure,
        "closed",
        kind="choice",
        read_by="web",
        doc="when the limit's state in Redis cannot be read, `closed` answers 503 and `open` "
        "lets the signup through unlimited. (When Redis itself is down no signup can be "
        "saved, so both answer 503)",
    )
    trusted_proxies: tuple[Network, ...] = setting(
        "TRUSTED_PROXIES",
        _networks,
        (),
        kind="list of IPs / CIDRs",
        read_by="web",
        shown="none",
        doc="peers whose `X-Forwarded-For` is believed, e.g. `10.0.0.0/8,192.168.1.4`. The "
        "client is the first address from the right of `X-Forwarded-For` that is not a "
        "trusted proxy; with none, the connection's peer",
    )
    ops_allow: tuple[Network, ...] = setting(
        "OPS_ALLOW",
        _networks,
        OPS_NETWORKS,
        kind="list of IPs / CIDRs",
        read_by="web",
        shown="loopback and private ranges",
        doc="clients that may read `/stats` and `/metrics` (operational detail); others get "
        "a 404, as for a route that does not exist. The client is found as for the rate "
        "limit (`TRUSTED_PROXIES`). Default: `127.0.0.0/8, ::1, 10.0.0.0/8, 172.16.0.0/12, "
        "192.168.0.0/16, fc00::/7`; `0.0.0.0/0,::/0` lets everyone in",
    )
    reserved_usernames: tuple[str, ...] = setting(
        "RESERVED_USERNAMES",
        _names,
        RESERVED_USERNAMES,
        kind="list of names, or `none`",
        read_by="web",
        doc='usernames nobody may take (422 `"is reserved"`), compared ignoring case, '
        "Unicode width and `_ . -`; a value replaces the whole list",
    )
    idempotency_key_ttl: int = setting(
        "IDEMPOTENCY_KEY_TTL",
        integer(1, 30 * 86_400),
        24 * 3600,
        kind="integer (seconds)",
        read_by="web",
        doc="seconds a signup's `Idempotency-Key` (and its 201) is remembered",
    )

    #: The environment these settings were read from: the reactions' own settings are read
    #: from it too, once :func:`pipeline.plan.resolve` knows which reactions there are.
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.cluster is not None:
            try:
                tagged = cluster_prefix(self.key_prefix)
            except ValueError as exc:
                raise SettingsError("KEY_PREFIX", self.key_prefix, str(exc)) from None
            object.__setattr__(self, "key_prefix", tagged)
        if self.redis_min_replicas and self.redis_replica_timeout >= self.redis_socket_timeout:
            raise SettingsError(
                "REDIS_REPLICA_TIMEOUT",
                f"{self.redis_replica_timeout:g}",
                f"must be below REDIS_SOCKET_TIMEOUT ({self.redis_socket_timeout:g}), which "
                "bounds the wait for the replicas' answer",
            )

    @property
    def dashboard_on_loopback(self) -> bool:
        """Whether the dashboard listens on a loopback address only."""
        host = self.dashboard_bind
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def sentinel(self) -> SentinelUrl | None:
        """The parsed ``redis+sentinel://`` URL, or None for a direct one."""
        if not self.redis_url.startswith(f"{SENTINEL_SCHEME}://"):
            return None
        return parse_sentinel_url(self.redis_url)

    @property
    def cluster(self) -> ClusterUrl | None:
        """The parsed ``redis+cluster://`` URL, or None for any other."""
        if not self.redis_url.startswith(tuple(f"{s}://" for s in CLUSTER_SCHEMES)):
            return None
        return parse_cluster_url(self.redis_url)

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
        """Build settings from ``environ`` (the process environment when None): each
        declared variable that is set (and not blank) is parsed; the rest keep their
        defaults. A bad value raises :class:`SettingsError` naming it."""
        env = dict(os.environ if environ is None else environ)
        return cls(**parse_env(cls, env), environ=env)


def declared_settings() -> dict[str, Setting]:
    """Field name -> declaration, for every setting :class:`Settings` reads, in order."""
    return declared(Settings)


#: Settings read by what runs the processes, not by Python: declared here all the same, so
#: the docs' settings table and ``.env.example`` list them.
OUTSIDE: tuple[Setting, ...] = (
    Setting("PORT", "integer", "Procfile", "the web's port", "8000"),
    Setting("WEB_CONCURRENCY", "integer", "Procfile", "hypercorn workers", "2"),
    Setting(
        "WEB_HOST",
        "address",
        "Procfile",
        "the address the web binds: every interface by default; `make run` sets `127.0.0.1` "
        "unless it is set (`WEB_HOST=0.0.0.0 make run` to be reached from elsewhere)",
        "0.0.0.0",
    ),
    Setting(
        "REDIS_SERVER",
        "path",
        "make run, tests",
        "path of the Redis (or Valkey) server binary to start; unset: see Two commands",
        "",
    ),
)
