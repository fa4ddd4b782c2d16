"""The incident patterns on Postgres, between separate backends and separate processes, against
a real PostgreSQL the tests start. Each race shows the naive read-check-write version failing."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import psycopg
import pytest

from keylock import KeyedLock, LeaseLost, StaleToken
from keylock.backends import PostgresBackend
from keylock.fencing import fenced_update

from .._pg_server import PgServer

ctx = multiprocessing.get_context("forkserver")


@pytest.fixture
def server(postgres_server: PgServer) -> PgServer:
    postgres_server.flush()
    postgres_server.execute("DROP TABLE IF EXISTS claims, counter, invoices")
    return postgres_server


async def test_twenty_claimers_on_separate_backends_one_winner(server: PgServer) -> None:
    """Incident 4 across hosts: 20 claimers, each with its own backend (its own pool and
    listener), read -> hop -> write a claim row; naive: several winners; locked: exactly one."""
    server.execute("CREATE TABLE claims (job text, winner int)")
    backends = [PostgresBackend.from_url(server.url) for _ in range(20)]
    raw = await psycopg.AsyncConnection.connect(server.url, autocommit=True)

    async def claim(i: int, locked: bool) -> None:
        async def read_decide_write() -> None:
            async with await psycopg.AsyncConnection.connect(server.url, autocommit=True) as c:
                found = await (await c.execute("SELECT 1 FROM claims WHERE job = 'j'")).fetchone()
                if found is None:  # read + decide ...
                    await asyncio.sleep(0.01)  # ... a hop ...
                    await c.execute("INSERT INTO claims VALUES ('j', %s)", (i,))  # ... write

        if locked:
            async with KeyedLock(backends[i])("job:1", timeout=30):
                await read_decide_write()
        else:
            await read_decide_write()

    await asyncio.gather(*(claim(i, locked=False) for i in range(20)))
    naive = await (await raw.execute("SELECT count(*) FROM claims")).fetchone()
    assert naive is not None
    assert naive[0] > 1  # naive: several winners
    await raw.execute("DELETE FROM claims")
    await asyncio.gather(*(claim(i, locked=True) for i in range(20)))
    winners = await (await raw.execute("SELECT count(*) FROM claims")).fetchone()
    assert winners == (1,)
    for backend in backends:
        await backend.close()
    await raw.close()


def _increment(url: str, rounds: int, locked: bool) -> None:
    locks = KeyedLock(PostgresBackend.from_url(url))
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(rounds):
            if locked:
                with locks.sync("counter", timeout=60):
                    row = conn.execute("SELECT n FROM counter").fetchone()
                    assert row is not None
                    conn.execute("UPDATE counter SET n = %s", (row[0] + 1,))
            else:
                row = conn.execute("SELECT n FROM counter").fetchone()
                assert row is not None
                time.sleep(0.002)
                conn.execute("UPDATE counter SET n = %s", (row[0] + 1,))
    locks.close_sync()


@pytest.mark.parametrize("locked", [True, False], ids=["keylock", "naive"])
def test_four_processes_increment_without_lost_updates(server: PgServer, locked: bool) -> None:
    server.execute("CREATE TABLE counter (n int)")
    server.execute("INSERT INTO counter VALUES (0)")
    procs = [ctx.Process(target=_increment, args=(server.url, 25, locked)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    total = server.execute("SELECT n FROM counter")[0][0]
    if locked:
        assert total == 100
    else:
        assert total < 100  # lost updates: the workload does race


def test_fenced_update_in_the_same_database_rejects_the_stale_holder(server: PgServer) -> None:
    """Incident 5 with the data in Postgres: holder A's lease lapses (it froze), B takes over
    with a higher token and writes inside its own transaction; A's late write raises
    StaleToken and changes nothing; A's release raises LeaseLost."""
    server.execute(
        "CREATE TABLE invoices (id int PRIMARY KEY, total int, fence bigint NOT NULL DEFAULT 0)"
    )
    server.execute("INSERT INTO invoices (id, total) VALUES (7, 0)")
    a = KeyedLock(PostgresBackend.from_url(server.url, auto_renew=False))
    b = KeyedLock(PostgresBackend.from_url(server.url))
    stale = a.acquire_sync("invoice:7", ttl=0.3)
    fresh = b.acquire_sync("invoice:7", timeout=10)  # granted once A's TTL runs out
    assert fresh.token > stale.token
    with psycopg.connect(server.url) as conn, conn.transaction():
        assert fenced_update(conn, "invoices", 7, fresh.token, {"total": 200})
    with pytest.raises(StaleToken), psycopg.connect(server.url) as conn, conn.transaction():
        fenced_update(conn, "invoices", 7, stale.token, {"total": 100})
    assert server.execute("SELECT total, fence FROM invoices") == [(200, fresh.token)]
    with pytest.raises(LeaseLost):
        stale.release_sync()
    fresh.release_sync()
    a.close_sync()
    b.close_sync()


def test_tokens_keep_rising_after_the_lock_table_is_truncated(server: PgServer) -> None:
    locks = KeyedLock(PostgresBackend.from_url(server.url))
    before = []
    for _ in range(3):
        with locks.sync("k") as lease:
            before.append(lease.token)
    server.flush()  # TRUNCATE: every row, with its last token, is gone
    with locks.sync("k") as lease:
        assert lease.token > max(before)
    locks.close_sync()


def test_errors_name_the_server_never_the_password(server: PgServer) -> None:
    url = "postgresql://keylock:s3cret-pw@127.0.0.1:1/app"
    locks = KeyedLock(PostgresBackend.from_url(url, connect_timeout=1.0))
    from keylock import BackendUnavailable

    with pytest.raises(BackendUnavailable) as info:
        locks.acquire_sync("k", timeout=1)
    assert "127.0.0.1:1/app" in str(info.value)
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in repr(locks._backend)  # type: ignore[attr-defined]
    locks.close_sync()
