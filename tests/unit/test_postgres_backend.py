"""The Postgres backend's wire cost, counted on the protocol (deterministic, unlike timings):
an uncontended acquire+release is two round trips, and the grants skip the WAL flush unless
``durable=True``."""

from __future__ import annotations

import asyncio

import psycopg_pool
import pytest

from keylock import KeyedLock
from keylock.backends import PostgresBackend

from .._pg_server import PgServer
from .._pg_trace import Trace, round_trips, sent_statements


def test_uncontended_acquire_release_is_two_round_trips_without_a_flush(
    postgres_server: PgServer, trace: Trace
) -> None:
    """One statement per acquire and one per release, in autocommit (no BEGIN/COMMIT trips),
    each committing with synchronous_commit off for its own transaction. Counted on the wire
    once psycopg has prepared them (after 5 uses; preparing costs one extra trip, once)."""
    postgres_server.flush()
    pool = psycopg_pool.ConnectionPool(
        postgres_server.url, min_size=1, max_size=1, configure=trace.configure, open=True
    )
    locks = KeyedLock(PostgresBackend(pool))
    with locks.sync("k"):  # the first use creates the schema
        pass
    trace.mark()
    for _ in range(6):
        with locks.sync("k", timeout=5):
            pass
    statements = set(sent_statements(trace.since_mark()))
    assert len(statements) == 2, statements  # the acquire and the release, nothing else
    for statement in statements:
        assert "BEGIN" not in statement.upper()
        assert "set_config('synchronous_commit', 'off', true)" in statement
    for _ in range(10):
        trace.mark()
        with locks.sync("k", timeout=5) as lease:
            assert lease.token > 0
        sent = trace.since_mark()
        assert round_trips(sent) == 2, sent
        assert not sent_statements(sent)  # prepared: no parse, no plan
    locks.close_sync()
    pool.close()


def test_async_acquire_release_is_tworound_trips(postgres_server: PgServer, trace: Trace) -> None:
    postgres_server.flush()

    async def body() -> list[int]:
        pool = psycopg_pool.AsyncConnectionPool(
            postgres_server.url,
            min_size=1,
            max_size=1,
            configure=trace.configure_async,
            open=False,
        )
        await pool.open()
        locks = KeyedLock(PostgresBackend(pool))
        async with locks("k"):
            pass
        for _ in range(6):  # prepared after 5 uses
            async with locks("k", timeout=5):
                pass
        trips = []
        for _ in range(10):
            trace.mark()
            async with locks("k", timeout=5):
                pass
            trips.append(round_trips(trace.since_mark()))
        await locks.close()
        await pool.close()
        return trips

    assert asyncio.run(body()) == [2] * 10


def test_durable_grants_wait_for_the_flush(postgres_server: PgServer, trace: Trace) -> None:
    """``durable=True`` sends the same two statements without turning synchronous_commit
    off, so each grant and release waits for the WAL flush and survives a server crash."""
    postgres_server.flush()
    pool = psycopg_pool.ConnectionPool(
        postgres_server.url, min_size=1, max_size=1, configure=trace.configure, open=True
    )
    # a table of its own: a durable backend makes the tables it uses logged, for everyone
    locks = KeyedLock(PostgresBackend(pool, durable=True, table="durable_flush_test"))
    with locks.sync("k"):
        pass
    trace.mark()
    with locks.sync("k"):
        pass
    sent = trace.since_mark()
    assert round_trips(sent) == 2
    statements = sent_statements(sent)
    assert len(statements) == 2
    assert not any("synchronous_commit" in statement for statement in statements)
    locks.close_sync()
    pool.close()


def test_the_fast_commit_is_this_transaction_only(postgres_server: PgServer) -> None:
    """The grant's ``set_config(..., true)`` ends with its transaction: the next statement on
    the same (pooled, maybe shared through PgBouncer) connection commits as configured."""
    postgres_server.flush()
    pool = psycopg_pool.ConnectionPool(postgres_server.url, min_size=1, max_size=1, open=True)
    locks = KeyedLock(PostgresBackend(pool))
    with locks.sync("k"):
        pass
    with pool.connection() as conn:
        conn.autocommit = True
        row = conn.execute("SHOW synchronous_commit").fetchone()
        assert row == ("on",)
    locks.close_sync()
    pool.close()


def test_a_grant_whose_reply_came_after_its_expiry_is_never_returned() -> None:
    """A statement that stalled longer than the TTL brought back a grant that had already
    run out, and the flow returned it (a lease already lost). Now it tries again at once."""
    from keylock.backends.base import Deadline, Grant
    from keylock.backends.postgres._flow import PostgresFlow
    from keylock.backends.postgres._waiting import ServerClock

    flow = PostgresFlow(
        "job",
        b"\1" * 16,
        0.05,
        Deadline("job", 10.0, 100.0),
        None,  # type: ignore[arg-type]
        Grant(1, None),
        1.0,
        ServerClock(),
    )
    assert flow.next(100.0) is not None
    flow.on_reply((1, 7, 50, False), 100.2)  # granted for 50 ms, answered 200 ms later
    assert flow.grant is None
    step = flow.next(100.2)
    assert step is not None
    assert step.trip is not None  # asks again at once
    flow.on_reply((1, 7, 50, False), 100.21)
    assert flow.grant is not None
    assert flow.grant[2] == pytest.approx(100.25)
