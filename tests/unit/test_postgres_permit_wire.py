"""The Postgres permits' wire cost, counted on the protocol: an uncontended permit
acquire+release is two round trips (one statement each, in autocommit, committing without the
WAL flush), as a lock's is, for a semaphore and for both RW modes, in both flavours."""

from __future__ import annotations

import asyncio

import psycopg_pool
import pytest

from keylock import KeyedLock
from keylock.backends import PostgresBackend
from keylock.backends.base import RW_LIMIT

from .._pg_server import PgServer
from .._pg_trace import Trace, round_trips, sent_statements

SHAPES = [(4, 1), (RW_LIMIT, 1), (RW_LIMIT, RW_LIMIT)]


@pytest.mark.parametrize(("limit", "weight"), SHAPES)
def test_uncontended_permit_is_two_round_trips_without_a_flush(
    postgres_server: PgServer, trace: Trace, limit: int, weight: int
) -> None:
    postgres_server.flush()
    pool = psycopg_pool.ConnectionPool(
        postgres_server.url, min_size=1, max_size=1, configure=trace.configure, open=True
    )
    backend = PostgresBackend(pool)
    locks = KeyedLock(backend.permits(limit, weight))
    with locks.sync("k"):  # the first use creates the schema
        pass
    trace.mark()
    for _ in range(6):  # psycopg prepares a statement at its 5th use
        with locks.sync("k", timeout=5):
            pass
    statements = set(sent_statements(trace.since_mark()))
    assert len(statements) == 2, statements  # the acquire and the release, nothing else
    for statement in statements:
        assert "_permit_" in statement
        assert "BEGIN" not in statement.upper()
        assert "set_config('synchronous_commit', 'off', true)" in statement
    for _ in range(10):
        trace.mark()
        with locks.sync("k", timeout=5) as lease:
            assert lease.token > 0
        sent = trace.since_mark()
        assert round_trips(sent) == 2, sent
        assert not sent_statements(sent)
    backend.close_sync()
    pool.close()


def test_async_permit_is_tworound_trips(postgres_server: PgServer, trace: Trace) -> None:
    postgres_server.flush()

    async def body() -> list[int]:
        pool = psycopg_pool.AsyncConnectionPool(
            postgres_server.url, min_size=1, max_size=1, configure=trace.configure_async, open=False
        )
        await pool.open()
        backend = PostgresBackend(pool)
        sem = KeyedLock(backend.permits(3))
        for _ in range(7):
            async with sem("k", timeout=5):
                pass
        trips = []
        for _ in range(10):
            trace.mark()
            async with sem("k", timeout=5):
                pass
            trips.append(round_trips(trace.since_mark()))
        await backend.close()
        await pool.close()
        return trips

    assert asyncio.run(body()) == [2] * 10
