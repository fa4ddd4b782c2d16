"""The one timer that bounds async Redis calls at the socket timeout (redis/_watchdog.py):
each call still gets its own deadline, to the call."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from keylock.backends.redis._resp import call_async
from keylock.backends.redis._watchdog import Watchdog


class _Conn:
    """What call_async uses of a redis.asyncio connection: its streams, and disconnect."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.disconnected = False

    async def disconnect(self, nowait: bool = False) -> None:
        self.disconnected = True
        self._writer.close()


class _Server:
    """Answers ``:1`` to each request line, except while ``silent``."""

    def __init__(self) -> None:
        self.silent = False
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []  # both ends, closed at the end

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.readline():
                if not self.silent:
                    writer.write(b":1\r\n")

    async def connect(self) -> _Conn:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.writers.append(writer)
        return _Conn(reader, writer)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[_Server]:
    s = _Server()
    s.server = await asyncio.start_server(s.serve, "127.0.0.1", 0)
    yield s
    await s.close()


async def _call(conn: _Conn, dog: Watchdog) -> object:
    return await call_async(conn, b"PING\r\n", dog.limit, dog)  # type: ignore[arg-type]


async def test_replies_in_time_pass_and_leave_no_timer_behind(server: _Server) -> None:
    dog = Watchdog(asyncio.get_running_loop(), 0.5)
    conns = [await server.connect() for _ in range(3)]
    for _ in range(20):
        assert await asyncio.gather(*(_call(c, dog) for c in conns)) == [1] * 3
    assert not any(c.disconnected for c in conns)
    assert not dog._due  # nothing in flight
    dog.close()


async def test_a_silent_server_times_each_call_out_at_its_own_deadline(server: _Server) -> None:
    """Calls started one after another each time out *limit* after their own start (the one
    timer re-arms for the next call in flight), and raise the client's TimeoutError; a call
    on another connection that gets its reply is not touched. Fails with a timer armed only
    for the first call (the others would wait for the next call to come along)."""
    limit = 0.3
    dog = Watchdog(asyncio.get_running_loop(), limit)
    conns = [await server.connect() for _ in range(3)]
    server.silent = True
    ended: list[float] = []
    started: list[float] = []

    async def call(conn: _Conn) -> None:
        started.append(time.monotonic())
        with pytest.raises(RedisTimeoutError):
            await _call(conn, dog)
        ended.append(time.monotonic())

    tasks = []
    for conn in conns:
        tasks.append(asyncio.ensure_future(call(conn)))
        await asyncio.sleep(0.1)  # (staggered starts: each its own deadline)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for start, end in zip(started, ended, strict=True):
        assert end - start >= limit - 0.01  # never before its own deadline
    assert all(c.disconnected for c in conns)
    server.silent = False
    fresh = await server.connect()
    assert await _call(fresh, dog) == 1  # the dog serves the next calls as before
    dog.close()


async def test_a_cancelled_call_leaves_the_watch(server: _Server) -> None:
    dog = Watchdog(asyncio.get_running_loop(), 5.0)
    conn = await server.connect()
    server.silent = True
    task = asyncio.ensure_future(_call(conn, dog))
    for _ in range(500):  # bounded: until the call is in flight
        if dog._due:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not dog._due
    dog.close()
