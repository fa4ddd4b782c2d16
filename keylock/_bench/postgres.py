"""Uncontended acquire+release on one PostgreSQL: keylock's PostgresBackend (sync and async)
against ``postgresql-lock`` (a session advisory lock on its own pinned connection), each timed
beside a ``SELECT 1`` round trip. Without ``postgres_url`` a server is started from the
pgserver wheel in a temporary directory (unix socket only)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import tempfile
import time
import warnings
from typing import TYPE_CHECKING

from .. import KeyedLock
from .harness import Row, Suite

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

__all__ = ["run"]

_Pair = tuple[float, float]  # (us per op, us per SELECT 1 sent right after it)
_ROUND_TRIP = "SELECT 1 round trip"


@contextlib.contextmanager
def _server(url: str | None, suite: Suite) -> Iterator[str | None]:
    if url is not None:
        yield url
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        suite.say("postgres: no server (pip install pgserver, or pass a URL); skipped")
        yield None
        return
    workdir = tempfile.mkdtemp(prefix="keylock-bench-pg-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_server = pgserver.get_server  # type: ignore[attr-defined]
        server = get_server(workdir, cleanup_mode="stop")
    try:
        suite.say("postgres: started pgserver's PostgreSQL on a unix socket")
        yield str(server.get_uri())
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def _paired(op: Callable[[], object], ping: Callable[[], object], n: int) -> _Pair:
    """Mean us of *op* and of a SELECT 1 sent right after each one (paired op by op: a
    loopback round trip drifts from one second to the next)."""
    op_s = ping_s = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        op()
        t1 = time.perf_counter()
        ping()
        op_s += t1 - t0
        ping_s += time.perf_counter() - t1
    return op_s / n * 1e6, ping_s / n * 1e6


async def _paired_async(
    op: Callable[[], Awaitable[object]], ping: Callable[[], Awaitable[object]], n: int
) -> _Pair:
    op_s = ping_s = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        await op()
        t1 = time.perf_counter()
        await ping()
        op_s += t1 - t0
        ping_s += time.perf_counter() - t1
    return op_s / n * 1e6, ping_s / n * 1e6


def _keylock_sync(url: str, n: int, *, durable: bool = True) -> _Pair:
    import psycopg

    from ..backends import PostgresBackend

    locks = KeyedLock(PostgresBackend.from_url(url, durable=durable))
    with psycopg.connect(url, autocommit=True) as pinger:

        def op() -> None:
            with locks.sync("bench:sync"):
                pass

        op()  # connect, create the schema
        pair = _paired(op, lambda: pinger.execute("SELECT 1").fetchone(), n)
    locks.close_sync()
    return pair


def _keylock_async(url: str, n: int) -> _Pair:
    import psycopg

    from ..backends import PostgresBackend

    async def body() -> _Pair:
        locks = KeyedLock(PostgresBackend.from_url(url))
        pinger = await psycopg.AsyncConnection.connect(url, autocommit=True)

        async def op() -> None:
            async with locks("bench:async"):
                pass

        async def ping() -> None:
            await (await pinger.execute("SELECT 1")).fetchone()

        await op()
        pair = await _paired_async(op, ping, n)
        await locks.close()
        await pinger.close()
        return pair

    return asyncio.run(body())


def _postgresql_lock(url: str, n: int) -> _Pair | None:
    try:
        import postgresql_lock
    except ImportError:
        return None
    import psycopg

    with (
        psycopg.connect(url, autocommit=True) as conn,
        psycopg.connect(url, autocommit=True) as pinger,
    ):

        def op() -> None:
            with postgresql_lock.Lock(conn, "bench:peer"):
                pass

        op()
        return _paired(op, lambda: pinger.execute("SELECT 1").fetchone(), n)


def run(suite: Suite, *, postgres_url: str | None = None) -> None:
    """Uncontended acquire+release, in SELECT 1 round trips and in us; rows go to *suite*."""
    with _server(postgres_url, suite) as url:
        if url is None:
            return
        n = 300 if suite.quick else 1_000
        figures: dict[str, list[_Pair]] = {}
        for _ in range(3 if suite.quick else 5):  # interleaved: drift hits every subject alike
            figures.setdefault("keylock PostgresBackend (sync)", []).append(_keylock_sync(url, n))
            figures.setdefault("keylock PostgresBackend (sync, durable=False)", []).append(
                _keylock_sync(url, n, durable=False)
            )
            figures.setdefault("keylock PostgresBackend (async)", []).append(_keylock_async(url, n))
            peer = _postgresql_lock(url, n)
            if peer is not None:
                figures.setdefault("postgresql-lock (advisory, pinned conn)", []).append(peer)
        workload = "postgres: uncontended acquire+release"
        pings = [p for pairs in figures.values() for _, p in pairs]
        suite.add(
            Row.of(
                workload,
                _ROUND_TRIP,
                "SELECT 1s",
                [1.0] * len(pings),
                reference=True,
                notes=f"{statistics.median(pings):.0f} us",
            )
        )
        for name, pairs in figures.items():
            us = statistics.median(op for op, _ in pairs)
            suite.add(
                Row.of(
                    workload,
                    name,
                    "SELECT 1s",
                    [op / ping for op, ping in pairs],
                    notes=f"{us:.0f} us",
                    extra={"us": us},
                )
            )
