"""Auto-pipelining: the calls concurrent callers make in the same event-loop tick go to Redis
as one pipeline, one round trip for all of them, whichever scripts (or plain reads) they are.

Each script still runs atomically on its own (a pipeline is not a transaction), and each
caller gets its own result or error. A failure of the round trip itself (Redis unreachable, a
timeout) fails every call of that batch, as it would have failed each of them alone.

With ``replicas`` set, a pipeline holding any write ends with ``WAIT replicas timeout``: on
the same connection and in the same round trip, the batch's writes are confirmed by that many
replicas, or every write of the batch fails with :class:`NotReplicatedError` (a read keeps its
answer).

A consumer shares one :class:`AutoPipeline` between every effect of its reactions (a
command or a script), their reads and its fetch loops' takes, so the jobs finishing in one
tick, and the queues taking in one tick, cost one round trip, not one per call.

At most one round trip per pipeline is out at a time: the calls made while it is out go
together in the next, as soon as it is back (a group commit). Under load that makes batches
as large as the load makes them, at the price of waiting for the round trip before; when
idle, a call goes at the end of its tick, as before.

So a pipeline needs one connection at a time. It borrows one from the client's pool for a
busy spell (its round trips back to back, while callers keep queueing) and gives it back
when nothing is pending, rather than once per round trip, whose pool locks, timer and
bookkeeping were a good part of its client work. A round trip is written and its replies
read under one timeout (the connection's socket timeout), not a timer per reply.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.errors import NotReplicatedError


@dataclass(slots=True)
class _Call:
    """One caller's command, and where its answer goes. ``script``: the script an EVALSHA
    runs (loaded again if Redis lost it); ``writes``: whether WAIT must confirm it;
    ``build``: makes the command when its round trip goes (then ``command`` is empty until
    then)."""

    command: tuple[Any, ...]
    future: asyncio.Future[Any]
    script: AsyncScript | None
    writes: bool
    build: Callable[[], tuple[Any, ...]] | None = None


class AutoPipeline:
    """Sends everything its callers ask for in one loop tick as one pipeline."""

    def __init__(
        self, redis: aioredis.Redis, replicas: int = 0, replica_timeout: float = 0.0
    ) -> None:
        self._redis = redis
        self._replicas = replicas
        self._replica_timeout_ms = max(1, round(replica_timeout * 1000))
        self._pending: list[_Call] = []
        #: The round trip out, if any: while it is, calls wait in _pending and its end sends them.
        self._out: asyncio.Task[None] | None = None
        self._scripts: dict[str, ScriptBatcher] = {}

    def script(self, source: str) -> ScriptBatcher:
        """The caller of the Lua script ``source`` through this pipeline (one per source)."""
        try:
            return self._scripts[source]
        except KeyError:
            batcher = self._scripts[source] = ScriptBatcher(self._redis, source, pipeline=self)
            return batcher

    def read(self, *command: Any) -> asyncio.Future[Any]:
        """Queue a read-only command (``"EXISTS", key``); its future resolves to the raw reply."""
        return self.queue(command, None, writes=False)

    def queue(
        self, command: tuple[Any, ...], script: AsyncScript | None, *, writes: bool
    ) -> asyncio.Future[Any]:
        """Queue ``command`` for this tick's round trip; ``script``: the script an EVALSHA
        runs (loaded again if Redis lost it); ``writes``: whether WAIT must confirm it."""
        return self._append(
            _Call(command, asyncio.get_running_loop().create_future(), script, writes)
        )

    def queue_built(
        self, build: Callable[[], tuple[Any, ...]], script: AsyncScript | None, *, writes: bool
    ) -> asyncio.Future[Any]:
        """Queue the command ``build()`` makes when its round trip goes (not now), so that
        whatever its maker gathers until then goes in it; otherwise as :meth:`queue`."""
        loop = asyncio.get_running_loop()
        return self._append(_Call((), loop.create_future(), script, writes, build))

    def _append(self, call: _Call) -> asyncio.Future[Any]:
        if not self._pending and self._out is None:
            # Else one is due already, or the round trip's end.
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(call)
        return call.future

    def _flush(self) -> None:
        """Start sending what is pending, unless a round trip is still out: then the busy
        spell it belongs to sends it next. So under load the calls made while one batch is
        out all go in the next (a group commit), one round trip for many, and an idle moment
        adds no wait."""
        if not self._pending or self._out is not None:
            return
        self._out = asyncio.ensure_future(self._send())
        self._out.add_done_callback(self._sent)

    def _sent(self, _: asyncio.Task[None]) -> None:
        self._out = None
        self._flush()  # anything queued while the connection went back

    async def _send(self) -> None:
        """One busy spell: round trips back to back on one borrowed connection while calls
        are pending, each batch what was queued during the one before."""
        pool = self._redis.connection_pool
        try:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        except Exception as exc:  # none to be had (the pool's timeout): the batch fails
            batch, self._pending = self._pending, []
            _fail(batch, exc)
            return
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._run(connection, batch)
                # The callers just answered run now; what they queue goes in the next batch.
                await asyncio.sleep(0)
        finally:
            await pool.release(connection)

    async def _run(self, connection: AbstractConnection, batch: list[_Call]) -> None:
        try:
            for call in batch:
                if call.build is not None:
                    call.command, call.build = call.build(), None
            results = await self._execute(connection, batch)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                # Redis lost its script cache (a restart, SCRIPT FLUSH): load them, go again,
                # on the same connection (the pool may have no other), in one round trip.
                lost = {id(batch[i].script): batch[i].script for i in missing}
                loads = [("SCRIPT", "LOAD", s.script) for s in lost.values() if s is not None]
                loaded = await self._round_trip(connection, loads)
                failed = next((r for r in loaded if isinstance(r, Exception)), None)
                if failed is not None:
                    raise failed
                retried = await self._execute(connection, [batch[i] for i in missing])
                for index, result in zip(missing, retried, strict=True):
                    results[index] = result
        except Exception as exc:  # the round trip failed: every call fails with it
            _fail(batch, exc)
            return
        for call, result in zip(batch, results, strict=True):
            if call.future.done():
                continue
            if isinstance(result, Exception):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)

    async def _execute(self, connection: AbstractConnection, batch: list[_Call]) -> list[Any]:
        commands = [call.command for call in batch]
        waits = bool(self._replicas) and any(call.writes for call in batch)
        if waits:
            commands.append(("WAIT", self._replicas, self._replica_timeout_ms))
        results = await self._round_trip(connection, commands)
        if waits:
            acknowledged = results.pop()
            if isinstance(acknowledged, Exception):
                raise acknowledged
            if acknowledged < self._replicas:
                # Every write that ran is unconfirmed (one refused for a missing script runs
                # again, with a WAIT of its own); reads keep their answers.
                short = NotReplicatedError(acknowledged, self._replicas)
                results = [
                    short if call.writes and not isinstance(r, NoScriptError) else r
                    for call, r in zip(batch, results, strict=True)
                ]
        return results

    async def _round_trip(
        self, connection: AbstractConnection, commands: list[tuple[Any, ...]]
    ) -> list[Any]:
        """Send ``commands`` in one write on ``connection`` and read every reply: a reply
        that is an error is returned in its place, as a pipeline without a transaction
        does. (redis-py's Pipeline does the same with several times the CPU per command:
        command stacks, response callbacks and its retry and bookkeeping layers, which the
        web client does not use: it never retries.) The commands are written and the
        replies read under one timeout, the connection's socket timeout (``math.inf`` asks
        redis-py 8.0.1 and later for no timer of its own per reply; earlier ones arm one
        that never fires, as before). A failure of the connection itself raises, and the
        connection is dropped rather than left half-read: the next round trip connects
        again."""
        try:
            results: list[Any] = []
            async with asyncio.timeout(connection.socket_timeout):
                if not connection.is_connected:  # dropped by a failed round trip before
                    await connection.connect()  # type: ignore[no-untyped-call]
                # Written under the same timeout, not send_packed_command's own (a task and
                # a timer of asyncio.wait_for's, about 10 us a round trip).
                await connection._send_packed_command(connection.pack_commands(commands))
                for _ in commands:
                    try:
                        results.append(await connection.read_response(timeout=math.inf))
                    except ResponseError as exc:
                        results.append(exc)
        except BaseException as exc:
            await connection.disconnect()
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"Timeout reading from {_where(connection)}") from None
            if isinstance(exc, OSError):  # a write refused (a reset): as send_packed_command
                raise RedisConnectionError(f"Error writing to {_where(connection)}: {exc}") from exc
            raise
        return results


def _fail(batch: list[_Call], exc: BaseException) -> None:
    for call in batch:
        if not call.future.done():
            call.future.set_exception(exc)


def _where(connection: AbstractConnection) -> str:
    host, port = getattr(connection, "host", None), getattr(connection, "port", None)
    return f"{host}:{port}" if host is not None else repr(connection)


class ScriptBatcher:
    """Calls one Lua script through an :class:`AutoPipeline`: its own, or one shared with
    other scripts (``pipeline=``), whose settings then apply."""

    def __init__(
        self,
        redis: aioredis.Redis,
        source: str,
        replicas: int = 0,
        replica_timeout: float = 0.0,
        *,
        pipeline: AutoPipeline | None = None,
    ) -> None:
        self._script = redis.register_script(source)
        self._pipeline = pipeline or AutoPipeline(redis, replicas, replica_timeout)

    def __call__(
        self, keys: Sequence[Any], args: Sequence[Any], *, confirmed: bool = True
    ) -> asyncio.Future[Any]:
        """Queue one call; its future resolves to the script's reply (or its error).
        ``confirmed=False``: a write that a ``WAIT`` need not confirm (its reply stands
        whatever the replicas say), such as a consumer's take."""
        command = ("EVALSHA", self._script.sha, len(keys), *keys, *args)
        return self._pipeline.queue(command, self._script, writes=confirmed)


P = TypeVar("P")


@dataclass(slots=True)
class _Group(Generic[P]):
    """The parts of one merged call, and their callers' futures; ``whole``: the call's."""

    whole: asyncio.Future[Any] | None = None
    parts: list[P] = field(default_factory=list)
    futures: list[asyncio.Future[Any]] = field(default_factory=list)


class MergedScript(Generic[P]):
    """Calls a Lua script that serves many callers in one call, through an
    :class:`AutoPipeline` (its own, or ``pipeline=``). Each caller gives its part
    (whatever ``build`` takes); the parts given while the script's call waits for its round
    trip all go in that call, whose ``KEYS`` and ``ARGV`` ``build(parts)`` makes when the
    round trip goes. The script answers a list, one entry per part in order, and each caller
    gets its own. A failure of the call (an error reply, ``NotReplicatedError``, the round
    trip's) fails every part of it.

    So a script's fixed cost, and whatever it does once for all its parts (one push per
    queue, one read of shared state), is paid once per round trip, not once per caller. The
    script is atomic as a whole: no other client's command runs between its parts.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        source: str,
        build: Callable[[list[P]], tuple[list[Any], list[Any]]],
        replicas: int = 0,
        replica_timeout: float = 0.0,
        *,
        pipeline: AutoPipeline | None = None,
    ) -> None:
        self._script = redis.register_script(source)
        self._pipeline = pipeline or AutoPipeline(redis, replicas, replica_timeout)
        self._build = build
        #: The call still gathering parts (its round trip has not gone), if any.
        self._open: _Group[P] | None = None

    def __call__(self, part: P) -> asyncio.Future[Any]:
        """Queue one part; its future resolves to its entry of the reply (or the error)."""
        group = self._open
        if group is None or group.whole is None or group.whole.done():
            group = self._open = _Group()
            group.whole = self._pipeline.queue_built(
                partial(self._command, group), self._script, writes=True
            )
            group.whole.add_done_callback(partial(_answer, group))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        group.parts.append(part)
        group.futures.append(future)
        return future

    def _command(self, group: _Group[P]) -> tuple[Any, ...]:
        if self._open is group:
            self._open = None  # parts from now on go in the next call
        keys, args = self._build(group.parts)
        return ("EVALSHA", self._script.sha, len(keys), *keys, *args)


def _answer(group: _Group[Any], whole: asyncio.Future[Any]) -> None:
    """Give each part of a merged call its entry of the reply, or the call's error."""
    if whole.cancelled():
        for future in group.futures:
            future.cancel()
        return
    error = whole.exception()
    if error is None:
        reply = whole.result()
        if isinstance(reply, list) and len(reply) == len(group.futures):
            for future, entry in zip(group.futures, reply, strict=True):
                if not future.done():
                    future.set_result(entry)
            return
        error = ResponseError(
            f"the merged script answered {reply!r} for {len(group.futures)} parts"
        )
    for future in group.futures:
        if not future.done():
            future.set_exception(error)
