"""Redis clients for each side, with every timeout set explicitly.

The web client fails fast (a down Redis is a quick 503, never a hang) and never retries: a
retried commit after a timeout could run twice. The consumer client's socket timeout stays
well above the fetch block time, so an idle BRPOP never times out client-side (which would
drop a reply the server may already have popped).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, ClassVar, cast
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import (
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    DefaultParser,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.errors import NotReplicatedError
from pipeline.settings import ClusterUrl, Settings

#: Seconds a consumer connection's socket timeout exceeds the BRPOP block time.
FETCH_SOCKET_MARGIN = 5.0


class NoReplicasError(ResponseError):
    """``NOREPLICAS``: fewer good replicas than ``min-replicas-to-write``; the write was refused."""


class MisconfError(ResponseError):
    """``MISCONF``: persistence is failing and ``stop-writes-on-bgsave-error`` refuses writes."""


class BusyError(ResponseError):
    """``BUSY``: a script or function has run past ``busy-reply-threshold``; nothing else runs."""


class ClusterModeError(ResponseError):
    """A Redis Cluster node's answer (``MOVED``, ``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``,
    ``CROSSSLOT``) to a client of a ``redis://`` URL: it names a node of a cluster. The node
    refused the command before running it, so nothing was written; it counts as Redis being
    unavailable (a 503, a consumer's backoff), with a message that says why."""

    def __str__(self) -> str:
        return (
            f"{self.status_code} {super().__str__()}: REDIS_URL points at a Redis Cluster node "
            "as if it were a standalone Redis: name the cluster with redis+cluster://host:port"
        )


class SlotMovedError(ResponseError, RedisConnectionError):
    """``MOVED``, from a cluster node: the keys' slot has a new owner. Nothing ran; the
    connection forgets the owner and closes, so the next one asks the cluster again (a
    consumer's command is retried on it at once, the web answers 503 this once)."""


class ClusterBusyError(ResponseError):
    """``ASK``, ``TRYAGAIN`` or ``CLUSTERDOWN``, from a cluster node: the slot is moving, or
    the cluster is failing over. Nothing ran; an outage until it settles."""


class _RefusalParser(DefaultParser):  # type: ignore[misc,valid-type]
    """redis-py's parser, knowing the error codes of the refusals it leaves as a bare
    ``ResponseError``. Redis 7 and Valkey give a script's error its command's code
    (``OOM … script: …``), so a refusal is recognised by class, never by its text."""

    EXCEPTION_CLASSES: ClassVar[dict[str, Any]] = {
        **DefaultParser.EXCEPTION_CLASSES,
        "NOREPLICAS": NoReplicasError,
        "MISCONF": MisconfError,
        "BUSY": BusyError,
        **dict.fromkeys(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "CROSSSLOT"), ClusterModeError),
    }


class _ClusterParser(_RefusalParser):
    """For a ``redis+cluster://`` URL: a cluster's redirections and refusals are expected."""

    EXCEPTION_CLASSES: ClassVar[dict[str, Any]] = {
        **_RefusalParser.EXCEPTION_CLASSES,
        "MOVED": SlotMovedError,
        **dict.fromkeys(("ASK", "TRYAGAIN", "CLUSTERDOWN"), ClusterBusyError),
        "CROSSSLOT": ResponseError,  # the keys' layout broke its one-slot rule: a bug
    }


#: Redis failures that mean "not reachable, or not taking writes, right now": a request gets a
#: 503 and a consumer backs off and tries again; neither is the fault of the signup or the job.
#: Each write refusal comes at a command's (or script's) first write, so nothing was written.
#: A write too few replicas confirmed (NotReplicatedError) is treated the same way.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    NotReplicatedError,
    RedisConnectionError,  # refused, reset, a wrong password (AuthenticationError)
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    OutOfMemoryError,
    NoReplicasError,
    MisconfError,
    BusyError,
    MasterDownError,
    ClusterModeError,
    ClusterBusyError,
)


class _HiredisPacking:
    """Commands packed by hiredis (C), as redis-py's sync client packs them: its asyncio
    client packs in Python, which was the largest client-side cost of a consumer's round trip
    (about 15 us for an ack-and-take of 8 jobs; 2.6 us this way). The bytes are the same."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py does: a command name with spaces ("CLIENT LIST") is several arguments.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


class HiredisConnection(_HiredisPacking, Connection):
    pass


class HiredisSSLConnection(_HiredisPacking, SSLConnection):
    pass


class HiredisUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


class HiredisSentinelConnection(_HiredisPacking, SentinelManagedConnection):
    """A connection to whichever server the sentinels name as the primary. redis-py drops it
    (and asks the sentinels again on the next connect) when the server it reaches answers
    READONLY: a demoted primary."""


class _ClusterOwner:
    """Connects to the cluster node that owns the keys' slot, as its pool last learnt it; a
    ``MOVED``, or an owner that cannot be reached (a failover), makes the pool forget the
    owner, so the next connection asks the cluster again."""

    host: str
    port: int

    def __init__(self, **kwargs: Any) -> None:
        self.connection_pool: _ClusterSlotPool = kwargs.pop("connection_pool")
        super().__init__(**kwargs)

    async def _connect(self) -> None:
        self.host, self.port = await self.connection_pool.owner()
        try:
            await super()._connect()  # type: ignore[misc]
        except (OSError, TimeoutError):  # a dead primary: ask who owns the slot now
            self.connection_pool.forget_owner((self.host, self.port))
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except SlotMovedError:
            self.connection_pool.forget_owner((self.host, self.port))
            raise


class HiredisClusterConnection(_ClusterOwner, _HiredisPacking, Connection):
    pass


class HiredisClusterSSLConnection(_ClusterOwner, _HiredisPacking, SSLConnection):
    pass


class _Sentinels(Sentinel):
    """redis-py's sentinel manager, whose "no primary found" error is one short line naming
    each sentinel tried and what it said (redis-py's repeats each client's whole pool)."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        tried = []
        for index, sentinel in enumerate(self.sentinels):
            where = _address(sentinel)
            try:
                masters = cast(dict[str, Any], await sentinel.sentinel_masters())
            except (RedisConnectionError, RedisTimeoutError) as exc:
                tried.append(f"{where} {_reason(exc)}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                # As redis-py does: ask this sentinel first next time.
                self.sentinels[0], self.sentinels[index] = sentinel, self.sentinels[0]
                return state["ip"], state["port"]
            tried.append(f"{where} {'has it down' if state else 'does not know it'}")
        raise MasterNotFoundError(
            f"no sentinel named a primary for {service_name!r} ({'; '.join(tried)})"
        )


def _address(client: aioredis.Redis) -> str:
    options = client.connection_pool.connection_kwargs
    return f"{options.get('host')}:{options.get('port')}"


def _reason(exc: Exception) -> str:
    """``Error 111 connecting to h:p. Connection refused.`` -> ``connection refused``."""
    text = str(exc).rstrip(".")
    return text.rsplit(". ", 1)[-1].lower() if ". " in text else text.lower()


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's sentinel pool (connections to the current primary, idle ones dropped when
    the sentinels name another), bounded and blocking like the direct pool. Closing it closes
    the connections to the sentinels too."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client's aclose(), not a switch to a new primary
            await self.sentinel_manager.aclose()


class _ClusterSlotPool(BlockingConnectionPool):
    """Connections to the primary that owns one slot (every key's: they share a hash tag),
    learnt by asking the URL's nodes (then any node they named) ``CLUSTER SLOTS``, and asked
    again after a ``MOVED`` or when no connection can be made: a resharding or a failover is
    followed without a restart. Everything else is a plain pool to one server."""

    def __init__(
        self,
        nodes: tuple[tuple[str, int], ...],
        slot: int,
        node_options: dict[str, Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.connection_kwargs["connection_pool"] = weakref.proxy(self)
        self._nodes = list(nodes)
        self._slot = slot
        self._node_options = node_options
        self._owner: tuple[str, int] | None = None
        self._asking: asyncio.Lock | None = None

    async def owner(self) -> tuple[str, int]:
        """The (host, port) of the slot's primary: as last learnt, or asked for now."""
        if self._owner is None:
            self._asking = self._asking or asyncio.Lock()
            async with self._asking:
                if self._owner is None:
                    self._owner = await self._discover()
        return self._owner

    def forget_owner(self, seen: tuple[str, int] | None = None) -> None:
        """Ask the cluster again at the next connection (``seen``: the owner a connection
        found wrong; a newer one learnt meanwhile is kept)."""
        if seen is None or self._owner == seen:
            self._owner = None

    async def release(self, connection: AbstractConnection) -> None:
        # A connection to a former owner is closed rather than pooled.
        owner = self._owner
        if owner is not None and (connection.host, connection.port) != owner:  # type: ignore[attr-defined]
            await connection.disconnect()
        await super().release(connection)

    async def _discover(self) -> tuple[str, int]:
        tried = []
        for host, port in list(self._nodes):
            node = aioredis.Redis(host=host, port=port, **self._node_options)
            try:
                slots = await node.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
                tried.append(f"{host}:{port} {_reason(exc)}")
                continue
            finally:
                await node.aclose()
            owner = None
            for first, last, primary, *replicas in slots:
                for known in (primary, *replicas):  # every node named: asked if these fail
                    address = (_text(known[0]) or host, int(known[1]))
                    if address not in self._nodes:
                        self._nodes.append(address)
                if int(first) <= self._slot <= int(last):
                    owner = (_text(primary[0]) or host, int(primary[1]))
            if owner is not None:
                return owner
            tried.append(f"{host}:{port} knows no owner of slot {self._slot}")
        raise RedisConnectionError(
            f"no cluster node named the primary of slot {self._slot} ({'; '.join(tried)})"
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def connection_class(url: str) -> type[AbstractConnection]:
    """The hiredis-packing connection class for the URL's scheme (what ``from_url`` would
    pick, which a ``connection_class`` argument would otherwise override)."""
    scheme = urlsplit(url).scheme
    if scheme == "rediss":
        return HiredisSSLConnection
    if scheme == "unix":
        return HiredisUnixConnection
    return HiredisConnection


def tls_options(settings: Settings) -> dict[str, Any]:
    """For ``rediss://`` and ``rediss+cluster://``: verify the server's certificate (and its
    host name) against ``REDIS_CA_FILE``, or the system's CAs when it is unset. Nothing for
    other schemes."""
    if urlsplit(settings.redis_url).scheme not in ("rediss", "rediss+cluster"):
        return {}
    return {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": settings.redis_ca_file,
    }


def _pool(settings: Settings, **options: Any) -> BlockingConnectionPool:
    """A bounded, blocking pool for ``REDIS_URL``: to that server, or, for a
    ``redis+sentinel://`` URL, to the primary its sentinels name (asked again on every new
    connection, so a failover is followed without a restart)."""
    options["parser_class"] = _RefusalParser
    cluster = settings.cluster
    if cluster is not None:
        return _cluster_pool(settings, cluster, **options)
    target = settings.sentinel
    if target is None:
        return BlockingConnectionPool.from_url(
            settings.redis_url,
            connection_class=connection_class(settings.redis_url),
            **tls_options(settings),
            **options,
        )
    sentinels = _Sentinels(  # type: ignore[no-untyped-call]
        target.sentinels,
        sentinel_kwargs={
            "password": settings.redis_sentinel_password,
            "socket_connect_timeout": options["socket_connect_timeout"],
            "socket_timeout": max(options["socket_connect_timeout"], 1.0),
            "retry": Retry(NoBackoff(), 0),
        },
    )
    return _BlockingSentinelPool(  # type: ignore[no-untyped-call]
        target.service,
        sentinels,
        db=target.db,
        username=target.username,
        password=target.password,
        connection_class=HiredisSentinelConnection,
        **options,
    )


def _cluster_pool(settings: Settings, cluster: ClusterUrl, **options: Any) -> _ClusterSlotPool:
    """The pool of a ``redis+cluster://`` URL: to the primary that owns the keys' slot."""
    tls = tls_options(settings)
    logins = {"username": cluster.username, "password": cluster.password}
    node_options = {
        **logins,
        **tls,
        "ssl": cluster.tls,
        "socket_connect_timeout": options["socket_connect_timeout"],
        "socket_timeout": max(options["socket_connect_timeout"], 1.0),
        "retry": Retry(NoBackoff(), 0),
    }
    options["parser_class"] = _ClusterParser
    return _ClusterSlotPool(
        cluster.nodes,
        key_slot(settings.key_prefix.encode()),
        node_options,
        connection_class=HiredisClusterSSLConnection if cluster.tls else HiredisClusterConnection,
        **logins,
        **tls,
        **options,
    )


def web_client(settings: Settings) -> aioredis.Redis:
    """A bounded pool: a burst waits up to ``redis_pool_timeout`` for a connection."""
    pool = _pool(
        settings,
        max_connections=settings.redis_pool_size,
        timeout=settings.redis_pool_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        socket_timeout=settings.redis_socket_timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
    )
    # from_pool: the client owns the pool, so aclose() closes its connections too.
    return aioredis.Redis.from_pool(pool)


def consumer_client(settings: Settings, max_connections: int) -> aioredis.Redis:
    """A pool with room for every fetcher and handler. A command that meets a dead connection
    (a pooled one that a restarted Redis closed) is retried on a new one, with backoff; a
    timeout is not retried, so a BRPOP whose reply may be in flight is never sent twice."""
    pool = _pool(
        settings,
        max_connections=max_connections,
        timeout=None,
        socket_connect_timeout=max(settings.redis_connect_timeout, 1.0),
        socket_timeout=settings.fetch_timeout + FETCH_SOCKET_MARGIN,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_timeout=False,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)
