"""One round trip per script call, on connections the backend owns.

redis-py's client wraps every command in pool bookkeeping, retries and metrics hooks: about
20 µs of CPU per call, which is a fifth of a loopback round trip and more than keylock's own
work. For a client on a plain connection pool the wire keeps its own idle connections (made by
the pool's connection class with the pool's options: TLS, unix sockets, auth all apply) and
talks to them directly; any other client (Cluster, Sentinel, a blocking or caching pool) is
used through its public API. Errors are redis-py's until :func:`map_errors`, the one
boundary where they become BackendUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import weakref
from typing import TYPE_CHECKING, TypeVar, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from ...errors import BackendUnavailable
from ..base import described
from ._cluster_then import call_many_then
from ._resp import call_sync, direct, pack

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator, Sequence

    from ..base import Permits
    from ._scripts import Script

__all__ = [
    "FAILURES",
    "Arg",
    "SyncWire",
    "describe",
    "in_background",
    "map_errors",
    "redact",
    "unavailable",
]

logger = logging.getLogger("keylock")
T = TypeVar("T")

Arg = str | bytes | int | float  # what a script accepts as an argument

# user:password@ in a URL, and password=... in an option list
_SECRET = re.compile(r"(?<=://)[^@/\s]*@|(?i:(password|passwd|pwd)\s*[=:]\s*)\S+")


def redact(text: str) -> str:
    """*text* with any credentials it quotes (a URL's user:password@, password=...) masked."""
    return _SECRET.sub(lambda m: f"{m.group(1)}***" if m.group(1) else "***@", text)


def describe(exc: BaseException) -> str:
    """*exc* for a message: redacted, and without the reprs of every Sentinel client that
    redis-py appends when no Sentinel names a primary."""
    text = str(exc)
    if isinstance(exc, redis.sentinel.MasterNotFoundError):
        text = text.partition(" : ")[0] + " (the Sentinels name no primary that is up)"
    if isinstance(exc, redis.AuthenticationError) or text.startswith("NOAUTH"):
        if text.startswith("HELLO must be called"):  # RESP3 servers' way to say NOAUTH
            text = "the server requires a password and none was given"
        # the hint is added after redact(), which would mask its placeholders
        return (
            f"{redact(text).rstrip('.')} (put the right password in the URL, "
            "redis://:PASSWORD@HOST:PORT/DB, or pass password=...)"
        )
    return redact(text) or type(exc).__name__


#: What the error boundary turns into BackendUnavailable: redis-py's errors (RedisCluster's
#: too) and socket errors.
FAILURES = (RedisError, RedisClusterException, OSError)


@contextlib.contextmanager
def map_errors(key: str, where: str) -> Iterator[None]:
    """The one error boundary: :data:`FAILURES` become BackendUnavailable naming *key* and the
    (redacted) address *where* (see :func:`unavailable`)."""
    try:
        yield
    except FAILURES as exc:
        raise unavailable(key, where, exc) from exc


def unavailable(
    key: str, where: str, exc: BaseException, shape: Permits | None = None
) -> BackendUnavailable:
    """The BackendUnavailable that *exc* (one of :data:`FAILURES`) becomes, for *key* at the
    (redacted) address *where*, naming *key* a lock, or as the permit *shape* makes it: the
    boundary, for the hot path that catches it inline."""
    return BackendUnavailable(
        f"Redis at {where} failed for {described(key, shape)}: {describe(exc).rstrip('.')}; "
        "nothing was granted or changed by this call; check the server and the URL",
        key=key,
    )


# How redis-py's own connections open a socket. The wire sets socket timeouts and reads
# replies itself only on these: a connection class that opens something else (fakeredis's
# in-process FakeSocket, a tunnel) is used through the client's public API.
_SOCKET_CONNECTS: set[object] = {
    cls._connect
    for cls in (
        redis.Connection,
        redis.SSLConnection,
        redis.UnixDomainSocketConnection,
        redis.asyncio.Connection,
        redis.asyncio.SSLConnection,
        redis.asyncio.UnixDomainSocketConnection,
    )
}


# Pools whose connections are made from the pool's class and options alone: a Sentinel pool's
# connections each ask the Sentinels for the primary as they connect (so a fresh connection
# after a failover reaches the new one).
_PLAIN_POOLS = (
    redis.ConnectionPool,
    redis.asyncio.ConnectionPool,
    redis.sentinel.SentinelConnectionPool,
    redis.asyncio.sentinel.SentinelConnectionPool,
)


def _plain_pool(client: object) -> object:
    """*client*'s pool if it talks to one server (or to the primary Sentinels name) through
    an ordinary pool of real sockets (direct calls are then safe), else None."""
    pool = getattr(client, "connection_pool", None)
    plain = (
        type(pool) in _PLAIN_POOLS
        and getattr(pool, "cache", None) is None
        and getattr(client, "connection", None) is None  # not a single-connection client
        and getattr(pool.connection_class, "_connect", None) in _SOCKET_CONNECTS  # type: ignore[union-attr]
    )
    return pool if plain else None


def _limit(timeout: float | None, socket_timeout: float | None) -> float | None:
    """How long to wait for a reply: the caller's bound, capped by the socket timeout."""
    if timeout is None:
        return socket_timeout
    if socket_timeout is not None:
        timeout = min(timeout, socket_timeout)
    return max(timeout, 0.001)


def _is_open(conn: redis.Connection) -> bool:
    return getattr(conn, "_sock", None) is not None


def _connect_within(conn: redis.Connection, timeout: float) -> None:
    """Open *conn* (the socket and redis-py's handshake) within *timeout* seconds: a new
    connection on a dead link must not cost the client's socket timeout (5 s by default)."""
    saved = conn.socket_timeout, conn.socket_connect_timeout
    conn.socket_timeout = _limit(timeout, saved[0])
    conn.socket_connect_timeout = _limit(timeout, saved[1])
    try:
        conn.connect()  # type: ignore[no-untyped-call]
    finally:
        conn.socket_timeout, conn.socket_connect_timeout = saved
    sock = getattr(conn, "_sock", None)
    if sock is not None:  # later calls: the client's own socket timeout again
        sock.settimeout(saved[0])


def _open(conn: redis.Connection, timeout: float | None) -> None:
    """Connect *conn* through its own connect() (a Sentinel-managed connection asks the
    Sentinels for the primary there; a send on a closed one would connect to its last
    address), within *timeout* if given."""
    if timeout is not None:
        _connect_within(conn, timeout)
    else:
        conn.connect()  # type: ignore[no-untyped-call]


class SyncWire:
    """Runs scripts for threads: each call takes an idle connection (or makes one), so
    concurrent callers never share a socket. A connection that fails is dropped; a call that
    failed to reach the server is retried once on a fresh connection (every script is safe to
    run twice: they compare the owner first)."""

    def __init__(self, client: redis.Redis | redis.cluster.RedisCluster) -> None:
        self._client = client
        self._pool = cast("redis.ConnectionPool | None", _plain_pool(client))
        self._idle: list[redis.Connection] = []  # list.pop/append are atomic: no lock needed
        self._made: weakref.WeakSet[redis.Connection] = weakref.WeakSet()  # closed by close()
        self._closed = False  # set by close(): a call still running fails, and is not retried
        # (a forked child gets a new wire: RedisBackend starts afresh after a fork)

    def call(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Arg],
        timeout: float | None = None,
        then: Sequence[Arg] | None = None,
    ) -> object:
        """One script call; with *timeout*, its reply is awaited at most that long (and never
        longer than the client's socket timeout): redis-py's TimeoutError then, the script
        having run or not. Only plain pools honour *timeout*. With *then* (a command, such as
        ``WAIT``), that command is sent on the same connection in the same write, and the
        result is ``(script's reply, then's reply)``."""
        sha, text = script.sha, script.text
        pool = self._pool
        if pool is None:
            if then is not None:
                return self._pipelined_then(script, keys, args, then)
            try:
                return self._client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                return self._client.eval(text, len(keys), *keys, *args)

        def exchange(conn: redis.Connection) -> object:
            # (redis-py's sync Connection is untyped: hence the ignores)
            # (no timeout: redis-py's default read, which costs no extra system calls)
            bound = {} if timeout is None else {"timeout": _limit(timeout, conn.socket_timeout)}
            if not _is_open(conn):
                _open(conn, timeout)
            if then is not None:
                replies = self._exchange(conn, "EVALSHA", sha, [(keys, args)], then, bound)
                if isinstance(replies[0], NoScriptError):  # (then ran too: harmless)
                    replies = self._exchange(conn, "EVAL", text, [(keys, args)], then, bound)
                if isinstance(replies[0], Exception):
                    raise replies[0]
                return replies[0], replies[1]
            if direct(conn):  # (see _resp: the same call, packed and read in one pass)
                limit = bound.get("timeout")
                try:
                    return call_sync(conn, pack(b"EVALSHA", script.sha_bytes, keys, args), limit)
                except NoScriptError:  # a new or flushed server: send the text once
                    return call_sync(conn, pack(b"EVAL", text.encode(), keys, args), limit)
            conn.send_command("EVALSHA", sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
            try:
                return conn.read_response(**bound)
            except NoScriptError:  # a new or flushed server: send the text once
                conn.send_command("EVAL", text, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
                return conn.read_response(**bound)

        return self._on_a_connection(pool, exchange)

    def call_many(
        self,
        script: Script,
        calls: Sequence[tuple[Sequence[str], Sequence[Arg]]],
        then: Sequence[Arg] | None = None,
        timeout: float | None = None,
    ) -> list[object]:
        """Many calls of *script* in one round trip (a pipeline); each call's reply, or the
        ResponseError it got, then the reply of the command *then* sent after them all (if
        given). A connection error fails the whole batch (retried once). *timeout* bounds
        the connection and each reply as in :meth:`call` (plain pools only)."""
        if not calls:
            return []
        pool = self._pool
        if pool is None:
            return self._pipelined(script, calls, then)

        def exchange(conn: redis.Connection) -> list[object]:
            bound = {} if timeout is None else {"timeout": _limit(timeout, conn.socket_timeout)}
            if not _is_open(conn):
                _open(conn, timeout)
            replies = self._exchange(conn, "EVALSHA", script.sha, calls, then, bound)
            missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:  # a new or flushed server: send the text for those once
                retried = [calls[n] for n in missing]
                again = self._exchange(conn, "EVAL", script.text, retried, then, bound)
                for n, reply in zip(missing, again[: len(missing)], strict=True):
                    replies[n] = reply
                if then is not None:  # the last word on what the replicas hold
                    replies[-1] = again[-1]
            return replies

        return self._on_a_connection(pool, exchange)

    def _on_a_connection(
        self, pool: redis.ConnectionPool, exchange: Callable[[redis.Connection], T]
    ) -> T:
        """Run *exchange* on an idle connection (or a new one), retried once on a fresh one
        after a connection error (every script is safe to run twice); a connection that
        failed any other way is dropped, since a reply may still be on its way."""
        for attempt in (1, 2):
            conn = self._connection(pool)
            try:
                result = exchange(conn)
            except RedisConnectionError:
                conn.disconnect()  # type: ignore[no-untyped-call]
                if attempt == 2:
                    raise
                continue
            except BaseException:
                conn.disconnect()  # type: ignore[no-untyped-call]
                raise
            self._idle.append(conn)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self, pool: redis.ConnectionPool) -> redis.Connection:
        """An idle connection, or a new one (not yet connected)."""
        if self._closed:  # (a call retried after close() would wait out a new handshake)
            raise RedisConnectionError("the backend was closed")
        try:
            return self._idle.pop()
        except IndexError:
            conn: redis.Connection = pool.connection_class(**pool.connection_kwargs)
            self._made.add(conn)
            return conn

    @staticmethod
    def _exchange(
        conn: redis.Connection,
        command: str,
        body: str,
        calls: Sequence[tuple[Sequence[str], Sequence[Arg]]],
        then: Sequence[Arg] | None = None,
        bound: dict[str, float | None] | None = None,
    ) -> list[object]:
        commands: list[tuple[Arg, ...]]
        commands = [(command, body, len(keys), *keys, *args) for keys, args in calls]
        if then is not None:
            commands.append(tuple(then))
        conn.send_packed_command(conn.pack_commands(commands))  # type: ignore[no-untyped-call]
        replies: list[object] = []
        for _ in commands:
            try:
                replies.append(conn.read_response(**(bound or {})))
            except ResponseError as exc:  # this call's error: the others' replies still follow
                replies.append(exc)
        return replies

    def _pipelined(
        self,
        script: Script,
        calls: Sequence[tuple[Sequence[str], Sequence[Arg]]],
        then: Sequence[Arg] | None = None,
    ) -> list[object]:
        """call_many through the client's own pipeline (Cluster: one per node, in parallel).
        Commands go in by name: a Cluster pipeline refuses its ``evalsha`` method, though it
        routes EVALSHA by its keys like any keyed command. A keyless *then* (WAIT) must
        follow the calls on their node's connection: on a Cluster, see :mod:`._cluster_then`."""
        if then is not None and isinstance(self._client, redis.cluster.RedisCluster):
            return call_many_then(self._client, script, calls, then)
        pipe = self._client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        if then is not None:
            pipe.execute_command(*then)
        replies = list(pipe.execute(raise_on_error=False))
        missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            pipe = self._client.pipeline(transaction=False)
            for n in missing:
                keys, args = calls[n]
                pipe.execute_command("EVAL", script.text, len(keys), *keys, *args)
            if then is not None:
                pipe.execute_command(*then)
            again = list(pipe.execute(raise_on_error=False))
            for n, reply in zip(missing, again[: len(missing)], strict=True):
                replies[n] = reply
            if then is not None:
                replies[-1] = again[-1]
        return replies

    def _pipelined_then(
        self, script: Script, keys: Sequence[str], args: Sequence[Arg], then: Sequence[Arg]
    ) -> tuple[object, object]:
        """call() with *then*, through the client's own pipeline (one connection)."""
        reply, after = self._pipelined(script, [(keys, args)], then)
        if isinstance(reply, Exception):
            raise reply
        return reply, after

    def close(self) -> None:
        """Close every connection made, idle or not (a call still running then fails)."""
        self._closed = True
        idle, self._idle = self._idle, []  # (held until closed: one dropped unclosed warns)
        for conn in {*idle, *self._made}:
            conn.disconnect()  # type: ignore[no-untyped-call]


background: set[asyncio.Future[object]] = set()  # calls going on alone, kept alive until done


def in_background(
    call: Coroutine[object, object, object], failed: str, level: int = logging.WARNING
) -> asyncio.Future[object]:
    """Run *call* to its end in a task nobody needs to await; if it fails, log *failed* and
    the error at *level*."""
    task = asyncio.ensure_future(call)
    background.add(task)
    task.add_done_callback(functools.partial(_forget, failed, level))
    return task


def _forget(failed: str, level: int, task: asyncio.Future[object]) -> None:
    background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.log(level, "keylock: %s: %s", failed, task.exception())
