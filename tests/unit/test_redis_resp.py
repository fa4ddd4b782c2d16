"""The direct script call (keylock.backends.redis._resp): it packs exactly what redis-py
packs, reads the common replies itself, and hands every other reply to redis-py's parser with
nothing lost or skipped."""

from __future__ import annotations

import asyncio
import socket

import pytest
import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from keylock.backends.redis import _resp, _scripts
from keylock.backends.redis._async_wire import AsyncWire
from keylock.backends.redis._wire import SyncWire

from .._redis_server import Server

ARGS: list[str | bytes | int | float] = ["owner", b"\x00\xffbytes", 30000, -2, 1.5, "clé"]


def test_pack_is_what_redis_py_packs() -> None:
    conn = redis.Connection()
    keys = ["{k}", "{k}:fence", "ключ"]
    expected = b"".join(conn.pack_command("EVALSHA", "ab" * 20, len(keys), *keys, *ARGS))
    assert _resp.pack(b"EVALSHA", b"ab" * 20, keys, ARGS) == expected


def test_pack_refuses_what_redis_py_refuses() -> None:
    with pytest.raises(TypeError, match="True"):
        _resp.pack(b"EVALSHA", b"x", [], [True])


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b":1\r\n", 1),
        (b"$3\r\nabc\r\n", b"abc"),
        (b"$-1\r\n", None),
        (b"_\r\n", None),
        (
            b"*4\r\n:1\r\n$16\r\n1795808409956815\r\n:30000\r\n:0\r\n",
            [1, b"1795808409956815", 30000, 0],
        ),
        (b"*2\r\n:0\r\n:-3\r\n", [0, -3]),
        (b"*2\r\n*1\r\n$1\r\n\r\r\n:5\r\n", [[b"\r"], 5]),
    ],
)
def test_common_replies_are_read_directly(data: bytes, reply: object) -> None:
    assert _resp._read(data) == reply


@pytest.mark.parametrize(
    "data",
    [
        b"-NOSCRIPT No matching script\r\n",  # an error: redis-py names its class
        b">3\r\n$10\r\ninvalidate\r\n",  # a RESP3 push
        b"*2\r\n:1\r\n",  # cut across reads
        b"$5\r\nab",
        b":1\r\n:2\r\n",  # more than one reply
        b"%1\r\n:1\r\n:2\r\n",  # a type no script returns
        b":x\r\n",  # malformed: redis-py says what is wrong
    ],
)
def test_other_replies_go_to_redis_py(data: bytes) -> None:
    with pytest.raises(_resp._Other):
        _resp._read(data)


def _paired() -> tuple[redis.Connection, socket.socket]:
    """A redis-py connection on one end of a socket pair (the test plays the server)."""
    ours, theirs = socket.socketpair()
    conn = redis.Connection(protocol=2)
    conn._sock = ours
    conn._parser.on_connect(conn)
    return conn, theirs


def test_a_reply_cut_across_reads_is_finished_by_redis_py() -> None:
    conn, server = _paired()
    server.sendall(b"16\r\n1795808409956815\r\n:30000\r\n:0\r\n")
    reply = _resp._read_by_redis_py(conn, b"*4\r\n:1\r\n$", None)
    assert reply == [1, b"1795808409956815", 30000, 0]
    assert conn._sock is not None  # nothing was left behind: the connection stays
    server.close()
    conn.disconnect()


def test_an_error_reply_raises_redis_py_s_error_class() -> None:
    conn, server = _paired()
    with pytest.raises(NoScriptError):
        _resp._read_by_redis_py(conn, b"-NOSCRIPT No matching script\r\n", None)
    with pytest.raises(ResponseError, match="boom"):
        _resp._read_by_redis_py(conn, b"-ERR boom\r\n", None)
    server.close()
    conn.disconnect()


def test_bytes_left_behind_a_reply_close_the_connection() -> None:
    """The next direct read would skip them and take them for its own reply."""
    conn, server = _paired()
    assert _resp._read_by_redis_py(conn, b":1\r\n:2\r\n", None) == 1
    assert conn._sock is None
    server.close()


def test_a_closed_socket_is_a_connection_error() -> None:
    conn, server = _paired()
    server.close()
    with pytest.raises(RedisConnectionError):
        _resp.call_sync(conn, b"*1\r\n$4\r\nPING\r\n", 1.0)
    assert conn._sock is None


def test_a_silent_server_is_a_timeout_within_the_bound() -> None:
    conn, server = _paired()
    with pytest.raises(redis.exceptions.TimeoutError):
        _resp.call_sync(conn, b"*1\r\n$4\r\nPING\r\n", 0.05)
    assert conn._sock is None
    server.close()


def _counter() -> _scripts.Script:
    return _scripts._script("test_counter", "return redis.call('INCR', KEYS[1])")


def test_sync_calls_survive_a_script_flush(redis_server: Server) -> None:
    """NOSCRIPT (read by redis-py) makes the wire send the text, on the same connection."""
    client = redis.Redis.from_url(redis_server.url)
    wire = SyncWire(client)
    script = _counter()
    try:
        assert wire.call(script, ["resp:sync"], []) == 1
        (conn,) = wire._idle
        assert _resp.direct(conn)
        client.script_flush()
        assert wire.call(script, ["resp:sync"], []) == 2
        assert wire._idle == [conn]
        assert conn._sock is not None
        assert wire.call(script, ["resp:sync"], [], timeout=1.0) == 3
    finally:
        wire.close()
        client.delete("resp:sync")
        client.close()


def test_async_calls_survive_a_script_flush(redis_server: Server) -> None:
    async def run() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        wire = AsyncWire(client)
        script = _counter()
        try:
            assert await wire.call(script, ["resp:async"], []) == 1
            (conn,) = wire._idle
            assert _resp.direct_async(conn)
            await client.script_flush()
            assert await wire.call(script, ["resp:async"], []) == 2
            assert wire._idle == [conn]
            assert conn.is_connected
            assert await wire.call(script, ["resp:async"], [], timeout=1.0) == 3
        finally:
            await wire.close()
            await client.delete("resp:async")
            await client.aclose()

    asyncio.run(run())


def test_a_fault_injecting_connection_class_is_not_bypassed() -> None:
    class Traced(redis.Connection):
        def read_response(self, *args: object, **kwargs: object) -> object:
            return super().read_response(*args, **kwargs)  # type: ignore[arg-type]

    conn, server = _paired()
    assert _resp.direct(conn)
    traced = Traced()
    traced._sock = conn._sock
    traced._parser.on_connect(traced)
    assert not _resp.direct(traced)
    server.close()
    conn.disconnect()


def test_a_connection_with_unread_bytes_is_read_by_redis_py() -> None:
    """A direct read would skip what the parser already buffered."""
    conn, server = _paired()
    assert _resp.direct(conn)
    buffer = conn._parser._buffer._buffer
    buffer.write(b":1\r\n")
    buffer.seek(0)
    assert not _resp.direct(conn)
    assert conn.read_response() == 1
    assert _resp.direct(conn)
    server.close()
    conn.disconnect()
