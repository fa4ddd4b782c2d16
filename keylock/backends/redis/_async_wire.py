"""The async twin of :class:`~._wire.SyncWire`: script calls for one event loop, on
connections the backend owns (see :mod:`._wire` for why, and for the error boundary)."""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._cluster_then import call_many_then_async
from ._resp import call_async, direct_async, pack
from ._watchdog import Watchdog
from ._wire import _limit, _plain_pool

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._scripts import Script
    from ._wire import Arg

__all__ = ["AsyncWire"]


class AsyncWire:
    """The same for one event loop (redis.asyncio connections belong to the loop they were
    made on). A call cancelled mid-reply drops its connection (redis-py disconnects it)."""

    def __init__(self, client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster) -> None:
        self._client = client
        self._pool = pool = cast("redis.asyncio.ConnectionPool | None", _plain_pool(client))
        self._idle: list[redis.asyncio.Connection] = []
        self._made: weakref.WeakSet[redis.asyncio.Connection] = weakref.WeakSet()
        # Our connections get no socket timeout of their own: redis-py then writes without
        # asyncio.wait_for, which on Python 3.11 costs a task per command. The client's socket
        # timeout still bounds every read and every handshake, here.
        options = {} if pool is None else pool.connection_kwargs
        self._options = {**options, "socket_timeout": None}
        self._closed = False  # as in SyncWire
        self._dog: Watchdog | None = None
        self._socket_timeout: float | None = None
        if pool is not None:  # the timeout the pool's connections get (redis-py's default: 5 s)
            self._socket_timeout = pool.connection_class(**options).socket_timeout

    async def call(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Arg],
        timeout: float | None = None,
        then: Sequence[Arg] | None = None,
    ) -> object:
        """One script call; *timeout* bounds the wait for its reply, as in :class:`SyncWire`
        (through the client's API, a cancel at the bound: TimeoutError); *then* as there."""
        sha, text = script.sha, script.text
        pool = self._pool
        if pool is None:
            async with asyncio.timeout(timeout):
                if then is not None:
                    return await self._pipelined_then(script, keys, args, then)
                try:
                    return await self._client.evalsha(sha, len(keys), *keys, *args)
                except NoScriptError:
                    return await self._client.eval(text, len(keys), *keys, *args)
        for attempt in (1, 2):
            if self._closed:
                raise RedisConnectionError("the backend was closed")
            try:
                conn = self._idle.pop()
            except IndexError:
                conn = pool.connection_class(**self._options)  # type: ignore[assignment]
                self._made.add(conn)
            limit = _limit(timeout, self._socket_timeout)
            reply: object
            try:
                if not conn.is_connected:
                    async with asyncio.timeout(limit):  # socket and handshake, both bounded
                        await conn.connect()  # type: ignore[no-untyped-call]
                if then is not None:
                    reply = await _exchange_then(conn, script, keys, args, then, limit)
                elif direct_async(conn):  # (see _resp: the same call, packed and read in one pass)
                    # bounded by the socket timeout alone: the loop's one timer for those
                    dog = self._watchdog(limit) if timeout is None and limit is not None else None
                    try:
                        packed = pack(b"EVALSHA", script.sha_bytes, keys, args)
                        reply = await call_async(conn, packed, limit, dog)
                    except NoScriptError:
                        packed = pack(b"EVAL", text.encode(), keys, args)
                        reply = await call_async(conn, packed, limit, dog)
                else:
                    await conn.send_command("EVALSHA", sha, len(keys), *keys, *args)
                    try:
                        reply = await conn.read_response(timeout=limit)
                    except NoScriptError:
                        await conn.send_command("EVAL", text, len(keys), *keys, *args)
                        reply = await conn.read_response(timeout=limit)
                if reply is None and limit is not None:
                    # redis-py answers None when a read given its own timeout runs out, and
                    # leaves the reply pending on the socket (a script never answers None)
                    raise RedisTimeoutError(f"no reply within {limit} s")
            except RedisConnectionError:
                await conn.disconnect()
                if attempt == 2:
                    raise
                continue
            except BaseException:
                # cancelled or failed mid-call: redis-py has already closed the socket unless
                # the error was a reply; close it in any case, without waiting
                await conn.disconnect(nowait=True)
                raise
            self._idle.append(conn)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def _watchdog(self, limit: float) -> Watchdog:
        dog = self._dog
        if dog is None:
            dog = self._dog = Watchdog(asyncio.get_running_loop(), limit)
        return dog

    async def _pipelined_then(
        self, script: Script, keys: Sequence[str], args: Sequence[Arg], then: Sequence[Arg]
    ) -> tuple[object, object]:
        """call() with *then*, through the client's own pipeline (one connection); on a
        Cluster, on the slot's node (see :mod:`._cluster_then`)."""
        replies: list[object] = []
        if isinstance(self._client, redis.asyncio.cluster.RedisCluster):
            replies = await call_many_then_async(self._client, script, [(keys, args)], then)
        for command, body in (("EVALSHA", script.sha), ("EVAL", script.text)):
            if replies:
                break
            pipe = self._client.pipeline(transaction=False)
            pipe.execute_command(command, body, len(keys), *keys, *args)
            pipe.execute_command(*then)
            replies = list(await pipe.execute(raise_on_error=False))
            if not isinstance(replies[0], NoScriptError):
                break
        if isinstance(replies[0], Exception):
            raise replies[0]
        return replies[0], replies[1]

    async def close(self) -> None:
        """Close every connection made, idle or not (a call still running then fails)."""
        self._closed = True
        if self._dog is not None:
            self._dog.close()
        idle, self._idle = self._idle, []  # (held until closed: one dropped unclosed warns)
        for conn in {*idle, *self._made}:
            await conn.disconnect()


async def _exchange_then(
    conn: redis.asyncio.Connection,
    script: Script,
    keys: Sequence[str],
    args: Sequence[Arg],
    then: Sequence[Arg],
    limit: float | None,
) -> tuple[object, object] | None:
    """The script and *then* in one write, and both replies (None if a read ran out of time:
    see AsyncWire.call)."""
    for command, body in (("EVALSHA", script.sha), ("EVAL", script.text)):
        packed = conn.pack_commands([(command, body, len(keys), *keys, *args), tuple(then)])
        await conn.send_packed_command(packed)
        try:
            reply = await conn.read_response(timeout=limit)
        except NoScriptError:  # a new or flushed server: then's reply follows, then the text
            if await conn.read_response(timeout=limit) is None:
                return None
            continue
        after = await conn.read_response(timeout=limit)
        if reply is None or after is None:
            return None
        return reply, after
    raise AssertionError("unreachable")  # pragma: no cover
