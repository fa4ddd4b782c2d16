"""UNLOGGED lease tables (the default) and what depends on a table that a crash empties: tokens
floored at the server clock keep rising, a crash ends every lease and its holder is told,
``durable=True`` keeps (or makes) every table logged, for every backend on it."""

from __future__ import annotations

import psycopg
import pytest

from keylock import KeyedLock, KeyedSemaphore, Lease
from keylock.backends import PostgresBackend
from keylock.backends.postgres._sql import tables

from .._pg_server import PgServer, running_postgres
from .._poll import polled


def _persistence(server: PgServer, table: str) -> dict[str, str]:
    """Each table of *table*'s schema -> 'u' (UNLOGGED) or 'p' (logged)."""
    rows = server.execute(
        "SELECT relname::text, relpersistence::text FROM pg_class "
        "WHERE oid = ANY(ARRAY[" + ", ".join(f"to_regclass('{t}')" for t in tables(table)) + "])"
    )
    return {str(name): str(kind) for name, kind in rows}


def _drop(server: PgServer, table: str) -> None:
    functions = server.execute(
        "SELECT oid::regprocedure::text FROM pg_proc WHERE starts_with(proname, %s)", (table,)
    )
    for (function,) in functions:
        server.execute(f"DROP FUNCTION IF EXISTS {function}")
    server.execute(f"DROP TABLE IF EXISTS {', '.join(tables(table))}")


def test_default_tables_are_unlogged_and_durable_makes_them_logged_for_all(
    postgres_server: PgServer,
) -> None:
    """A default backend creates all five tables UNLOGGED (no WAL for lease rows); a
    ``durable=True`` backend on them makes every one logged, and a default backend after it
    never turns them back (the safer setting wins). A durable backend creates them logged.
    Failed before UNLOGGED tables: the default backend's tables were logged."""
    table = "unlogged_choice_test"
    _drop(postgres_server, table)
    try:
        fast = KeyedLock(PostgresBackend.from_url(postgres_server.url, table=table))
        with fast.sync("k"):
            pass
        assert _persistence(postgres_server, table) == dict.fromkeys(tables(table), "u")
        durable = KeyedLock(
            PostgresBackend.from_url(postgres_server.url, table=table, durable=True)
        )
        with durable.sync("k") as lease:
            assert _persistence(postgres_server, table) == dict.fromkeys(tables(table), "p")
        again = KeyedLock(PostgresBackend.from_url(postgres_server.url, table=table))
        with again.sync("k") as after:  # the rows and tokens survived the rewrite
            assert after.token > lease.token
        assert _persistence(postgres_server, table) == dict.fromkeys(tables(table), "p")
        for locks in (fast, durable, again):
            locks.close_sync()
        _drop(postgres_server, table)
        fresh = KeyedLock(PostgresBackend.from_url(postgres_server.url, table=table, durable=True))
        with fresh.sync("k"):
            pass
        assert _persistence(postgres_server, table) == dict.fromkeys(tables(table), "p")
        fresh.close_sync()
    finally:
        _drop(postgres_server, table)


def test_tokens_rise_when_the_tables_are_truncated_between_every_grant(
    postgres_server: PgServer,
) -> None:
    """What a crash does to an UNLOGGED table, done between every two grants: each lock and
    permit token is still above every earlier one (tokens are floored at the server clock in
    µs, not only counted from the row)."""
    postgres_server.flush()
    backend = PostgresBackend.from_url(postgres_server.url)
    locks, sem = KeyedLock(backend), KeyedSemaphore(backend, limit=2)
    seen: list[int] = []
    for _ in range(20):
        with locks.sync("k") as lease:
            seen.append(lease.token)
        postgres_server.flush()
        with sem.sync("k") as permit:
            seen.append(permit.token)
        postgres_server.flush()
    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen)
    locks.close_sync()


@pytest.mark.parametrize("durable", [False, True])
def test_a_crash_ends_every_lease_unless_durable_and_holders_are_told(durable: bool) -> None:
    """The server crashes (``immediate`` restart) while a lock and a permit are held,
    auto-renewed. By default the tables are UNLOGGED, so crash recovery empties them: both
    leases end, each holder learns it at its next renewal (``lease.lost``), and the next
    grants' tokens are above the lost ones. With ``durable=True`` the tables are logged and
    both leases survive the crash, renewed through it. Failed before UNLOGGED tables (the
    default's leases, flushed before the crash, survived it)."""
    with running_postgres() as own:
        lost: list[Lease] = []
        # a 5 s TTL outlasts psycopg_pool's reconnection backoff (1 s, then 2 s...): a durable
        # lease is renewed through the restart, not reported lost for a slow reconnection
        backend = PostgresBackend.from_url(own.url, ttl=5.0, durable=durable)
        locks = KeyedLock(backend, on_lost=lost.append)
        sem = KeyedSemaphore(backend, limit=2, on_lost=lost.append)
        lease = locks.acquire_sync("k")
        permit = sem.acquire_sync("k")
        # the WAL flushed past both grants: a logged table would keep them through the crash
        written = own.execute("SELECT pg_current_wal_insert_lsn()::text")[0][0]
        assert polled(
            lambda: own.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (written,))[0][
                0
            ],
            timeout=10,
        )
        own.restart("immediate")
        rows = own.execute("SELECT count(*) FROM keylock_leases")[0][0]
        assert rows == (1 if durable else 0)
        if durable:
            renewed = (lease.expires_at, permit.expires_at)
            assert polled(
                lambda: lease.expires_at > renewed[0] and permit.expires_at > renewed[1],  # type: ignore[operator]
                timeout=15,
            )
            assert not lease.lost
            assert not permit.lost
            lease.release_sync()
            permit.release_sync()
        else:
            assert polled(lambda: lease.lost and permit.lost, timeout=15)
            # on_lost runs after the lease is marked lost, from the renewer's thread
            assert polled(lambda: {id(x) for x in lost} == {id(lease), id(permit)}, timeout=5)
        other = PostgresBackend.from_url(own.url)
        with KeyedLock(other).sync("k", timeout=10) as after:
            assert after.token > lease.token
        with KeyedSemaphore(other, limit=2).sync("k", timeout=10) as again:
            assert again.token > permit.token
        locks.close_sync()
        other.close_sync()


def test_a_forced_durable_commit_still_works_on_unlogged_tables(postgres_server: PgServer) -> None:
    """The operator's force-release commits durably (it waits for the flush): on UNLOGGED
    tables that is a plain commit, and it frees the key."""
    from keylock.backends.postgres import force_release

    postgres_server.flush()
    locks = KeyedLock(PostgresBackend.from_url(postgres_server.url), namespace="app")
    lease = locks.acquire_sync("k")
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        assert force_release(conn, "app\x00k")
    other = KeyedLock(PostgresBackend.from_url(postgres_server.url), namespace="app")
    with other.sync("k", timeout=0) as after:
        assert after.token > lease.token
    other.close_sync()
    locks.close_sync()
