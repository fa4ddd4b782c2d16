"""A script call written and read on a redis-py connection's own socket, for the common reply.

Every acquire and release is one script call, and redis-py's generic path (``send_command``,
then ``read_response``) costs about 15 µs of CPU per call to pack the arguments and to read
the reply through its buffered parser: a third of a loopback round trip. Here the call is
packed in one pass and its reply read straight from the socket; a reply this module does not
read itself (an error, a RESP3 push, a reply cut across reads, any type a script does not
return) is handed to the connection's own parser, which reads it exactly as it would have
(a Sentinel-managed connection still turns READONLY into a reconnect). Socket errors become
redis-py's ConnectionError / TimeoutError, with the connection closed, as redis-py's own
send and read do: the wire's error boundary (:func:`._wire.map_errors`) sees the same errors
either way.

Only stock redis-py connections on real sockets qualify (:func:`direct`): a connection class
that overrides how commands are sent or read (a test's fault injector, a tracing wrapper) is
used through its own methods.
"""

from __future__ import annotations

import io
import socket
from typing import TYPE_CHECKING, cast

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.sentinel
import redis.connection
import redis.sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Sequence

    from ._watchdog import Watchdog
    from ._wire import Arg

__all__ = ["call_async", "call_sync", "direct", "direct_async", "pack"]

_CLOSED = "Connection closed by server."
_READ_SIZE = 65536


class _Other(Exception):
    """The reply is one this module leaves to redis-py's parser (or is not complete yet)."""


def pack(command: bytes, body: bytes, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
    """``command body len(keys) *keys *args`` in RESP, as redis-py's packer writes it (str
    as UTF-8, int in decimal, float by repr); TypeError for anything else."""
    count = b"%d" % len(keys)
    parts = [
        b"*%d\r\n$%d\r\n%b\r\n" % (3 + len(keys) + len(args), len(command), command),
        b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(body), body, len(count), count),
    ]
    for key in keys:
        data = key.encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    for value in args:
        kind = type(value)  # (exact types: a bool, or a str subclass, goes the long way)
        if kind is bytes:
            data = value  # type: ignore[assignment]
        elif kind is int:
            data = b"%d" % value  # type: ignore[str-format]
        elif kind is str:
            data = value.encode()  # type: ignore[union-attr]
        else:
            data = _bytes(value)
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def _bytes(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool) or not isinstance(value, int | float):  # (as redis-py refuses)
        raise TypeError(f"a script argument must be str, bytes, int or float, not {value!r}")
    return b"%d" % value if isinstance(value, int) else repr(value).encode()


def _parse(buf: bytes, pos: int) -> tuple[object, int]:
    """The reply at *pos* in *buf* and where it ends, as redis-py reads it from a client that
    does not decode (integers, bulk bytes, nulls, arrays of those); _Other for anything else,
    or a reply not wholly in *buf*."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Other
    kind = buf[pos]
    if kind == 58:  # ':' integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 36:  # '$' bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            raise _Other
        return buf[end + 2 : stop], stop + 2
    if kind == 42:  # '*' array
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items = []
        pos = end + 2
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 95:  # '_' RESP3 null
        return None, end + 2
    raise _Other


def _read(data: bytes) -> object:
    """The one reply in *data*; _Other when redis-py's parser must read it (ValueError from a
    malformed length goes there too: redis-py then says what is wrong)."""
    try:
        reply, end = _parse(data, 0)
    except (ValueError, IndexError) as exc:
        raise _Other from exc
    if end != len(data):  # (more than the one reply asked for: leave it all to redis-py)
        raise _Other
    return reply


# ------------------------------------------------------------------------------ threads


_SYNC_READS: set[object] = {
    redis.connection.AbstractConnection.read_response,
    redis.sentinel.SentinelManagedConnection.read_response,  # (only errors differ: not ours)
}
_sync_classes: dict[tuple[type, type], bool] = {}


def direct(conn: redis.Connection) -> bool:
    """Whether *conn* is a stock redis-py connection, open on a real socket, whose parser
    this module can hand a reply to."""
    shape = (type(conn), type(getattr(conn, "_parser", None)))
    stock = _sync_classes.get(shape)
    if stock is None:
        cls, base = shape[0], redis.connection.AbstractConnection
        stock = _sync_classes[shape] = (
            issubclass(cls, base)
            and cls.send_command is base.send_command
            and cls.send_packed_command is base.send_packed_command
            and cls.read_response in _SYNC_READS
        )
    return (
        stock
        and not getattr(conn, "health_check_interval", None)
        and isinstance(getattr(conn, "_sock", None), socket.socket)
        and _drained(_sync_buffer(conn))
    )


def _drained(buffer: io.BytesIO | None) -> bool:
    """Whether *buffer* is a parser's buffer with nothing unread in it (a direct read would
    skip what is)."""
    if buffer is None:
        return False
    at = buffer.tell()
    end = buffer.seek(0, io.SEEK_END)
    buffer.seek(at)
    return end == at


def _sync_buffer(conn: redis.Connection) -> io.BytesIO | None:
    """What *conn*'s parser has read ahead of its replies: the BytesIO of redis-py's
    SocketBuffer (its Python parsers); None for any other parser (hiredis: its own reader)."""
    buffer = getattr(getattr(getattr(conn, "_parser", None), "_buffer", None), "_buffer", None)
    return buffer if isinstance(buffer, io.BytesIO) else None


def _read_by_redis_py(conn: redis.Connection, data: bytes, timeout: float | None) -> object:
    """The reply that starts with *data* (read from the socket), read by *conn*'s parser as
    if it had read *data* itself. Were anything left unread behind that reply, the next
    direct read would skip it: then the connection is closed."""
    buffer = _sync_buffer(conn)
    assert buffer is not None
    at = buffer.tell()
    buffer.seek(0, io.SEEK_END)
    buffer.write(data)
    buffer.seek(at)
    bound = {} if timeout is None else {"timeout": timeout}
    try:
        return conn.read_response(**bound)
    finally:
        buffer = _sync_buffer(conn)  # (None once the read closed the connection)
        if buffer is not None:
            at = buffer.tell()
            if buffer.seek(0, io.SEEK_END) > at:
                conn.disconnect()  # type: ignore[no-untyped-call]
            else:
                buffer.seek(at)


def call_sync(conn: redis.Connection, packed: bytes, timeout: float | None) -> object:
    """Send *packed* on *conn* (``direct(conn)``) and read its reply, waiting at most
    *timeout* seconds if given, else the socket's own timeout. redis-py's errors, as its
    send_command and read_response raise them."""
    sock = cast("socket.socket", getattr(conn, "_sock"))  # noqa: B009 (private to redis-py)
    try:
        sock.sendall(packed)
    except TimeoutError:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
    except BaseException:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise
    if timeout is not None:
        sock.settimeout(timeout)
    try:
        data = sock.recv(_READ_SIZE)
    except TimeoutError:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise RedisTimeoutError("Timeout reading from socket") from None
    except OSError as exc:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise RedisConnectionError(f"Error while reading from socket: {exc}") from exc
    except BaseException:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise
    finally:
        if timeout is not None and getattr(conn, "_sock", None) is sock:
            sock.settimeout(conn.socket_timeout)
    if not data:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise RedisConnectionError(_CLOSED)
    try:
        return _read(data)
    except _Other:
        return _read_by_redis_py(conn, data, timeout)


# ---------------------------------------------------------------------------- event loops


_ASYNC_READS: set[object] = {
    redis.asyncio.connection.AbstractConnection.read_response,
    redis.asyncio.sentinel.SentinelManagedConnection.read_response,  # (as _SYNC_READS)
}
_async_classes: dict[type, bool] = {}


def direct_async(conn: redis.asyncio.Connection) -> bool:
    """:func:`direct` for a redis.asyncio connection: stock, connected, on a StreamReader
    whose buffer a reply can be put back in front of."""
    cls = type(conn)
    stock = _async_classes.get(cls)
    if stock is None:
        base = redis.asyncio.connection.AbstractConnection
        stock = _async_classes[cls] = (
            issubclass(cls, base)
            and cls.send_command is base.send_command
            and cls.send_packed_command is base.send_packed_command
            and cls.read_response in _ASYNC_READS
        )
    if not stock or getattr(conn, "health_check_interval", None) or conn.socket_timeout:
        return False
    buffered = getattr(getattr(conn, "_reader", None), "_buffer", None)
    # (an empty one: a direct read would skip what is in it)
    return isinstance(buffered, bytearray) and not buffered and conn._writer is not None


async def call_async(
    conn: redis.asyncio.Connection,
    packed: bytes,
    timeout: float | None,
    watchdog: Watchdog | None = None,
) -> object:
    """:func:`call_sync` on an event loop (``direct_async(conn)``): the reply is awaited at
    most *timeout* seconds (None: without a bound), by *watchdog* when given (its limit is
    *timeout*)."""
    import asyncio

    reader: asyncio.StreamReader = conn._reader  # type: ignore[assignment]
    writer: asyncio.StreamWriter = conn._writer  # type: ignore[assignment]
    try:
        writer.write(packed)
        await writer.drain()
    except OSError as exc:
        await conn.disconnect(nowait=True)
        raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    try:
        if watchdog is not None:
            watchdog.start(conn)
            try:
                data = await reader.read(_READ_SIZE)
            finally:
                expired = watchdog.done(conn)
            if expired:  # it aborted the connection: the read got nothing
                raise TimeoutError
        elif timeout is None:
            data = await reader.read(_READ_SIZE)
        else:
            async with asyncio.timeout(timeout):
                data = await reader.read(_READ_SIZE)
    except TimeoutError:
        await conn.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout reading from socket") from None
    except OSError as exc:
        await conn.disconnect(nowait=True)
        raise RedisConnectionError(f"Error while reading from socket: {exc}") from exc
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    if not data:
        await conn.disconnect(nowait=True)
        raise RedisConnectionError(_CLOSED)
    try:
        return _read(data)
    except _Other:
        pass
    # redis-py's parser reads it, as if it had read *data* itself (None: it ran out of time,
    # for the caller to handle); anything left unread behind the reply would be skipped by the
    # next direct read, so the connection is closed then
    buffered: bytearray = reader._buffer  # type: ignore[attr-defined]
    buffered[:0] = data
    try:
        return await conn.read_response(timeout=timeout)
    finally:
        if buffered and conn.is_connected:
            await conn.disconnect(nowait=True)
