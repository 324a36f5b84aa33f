"""Auto-pipelining of one Lua script: the calls concurrent callers make in the same event-loop
tick go to Redis as one pipeline of EVALSHAs, one round trip for all of them.

Each script still runs atomically on its own (a pipeline is not a transaction), and each
caller gets its own result or error. A failure of the round trip itself (Redis unreachable, a
timeout) fails every call of that batch, as it would have failed each of them alone.

With ``replicas`` set, the pipeline ends with ``WAIT replicas timeout``: on the same connection
and in the same round trip, the batch's writes are confirmed by that many replicas, or every
call of the batch fails with :class:`NotReplicatedError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from pipeline.errors import NotReplicatedError

Call = tuple[Sequence[Any], Sequence[Any], asyncio.Future[Any]]


class ScriptBatcher:
    """Calls one script for many concurrent callers, a pipeline per loop tick."""

    def __init__(
        self, redis: aioredis.Redis, source: str, replicas: int = 0, replica_timeout: float = 0.0
    ) -> None:
        self._redis = redis
        self._script = redis.register_script(source)
        self._replicas = replicas
        self._replica_timeout_ms = max(1, round(replica_timeout * 1000))
        self._pending: list[Call] = []
        self._flushing: set[asyncio.Task[None]] = set()

    def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue one call; its future resolves to the script's reply (or its error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((keys, args, future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._run(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _run(self, batch: list[Call]) -> None:
        try:
            results = await self._execute(batch)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                # Redis lost its script cache (a restart, SCRIPT FLUSH): load it, go again.
                await self._redis.script_load(self._script.script)
                retried = await self._execute([batch[i] for i in missing])
                for index, result in zip(missing, retried, strict=True):
                    results[index] = result
        except Exception as exc:  # the round trip failed: every call fails with it
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, batch: list[Call]) -> list[Any]:
        commands: list[tuple[Any, ...]] = [
            ("EVALSHA", self._script.sha, len(keys), *keys, *args) for keys, args, _ in batch
        ]
        if self._replicas:
            commands.append(("WAIT", self._replicas, self._replica_timeout_ms))
        results = await self._round_trip(commands)
        if self._replicas:
            acknowledged = results.pop()
            if isinstance(acknowledged, Exception):
                raise acknowledged
            if acknowledged < self._replicas:
                # Every call that ran is unconfirmed (one refused for a missing script runs
                # again, with a WAIT of its own).
                short = NotReplicatedError(acknowledged, self._replicas)
                results = [r if isinstance(r, NoScriptError) else short for r in results]
        return results

    async def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write on one pooled connection and read every reply: a
        reply that is an error is returned in its place, as a pipeline without a transaction
        does. (redis-py's Pipeline does the same with several times the CPU per command:
        command stacks, response callbacks and its retry and bookkeeping layers, which the
        web client does not use: it never retries.) A failure of the connection itself
        raises, and the connection is dropped rather than returned half-read."""
        pool = self._redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(connection.pack_commands(commands))
            results: list[Any] = []
            for _ in commands:
                try:
                    results.append(await connection.read_response())
                except ResponseError as exc:
                    results.append(exc)
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        return results
