"""The incident patterns on Postgres, between separate backends and separate processes, against
a real PostgreSQL the tests start. Each race shows the naive read-check-write version failing."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time

import psycopg
import pytest

from keylock import KeyedLock, LeaseLost, LockTimeout, StaleToken
from keylock.backends import PostgresBackend
from keylock.fencing import fenced_update

from .._pg_server import PgServer

ctx = multiprocessing.get_context("forkserver")


@pytest.fixture
def server(postgres_server: PgServer) -> PgServer:
    postgres_server.flush()
    postgres_server.execute("DROP TABLE IF EXISTS claims, counter, invoices")
    return postgres_server


def _wait_for(condition: object, timeout: float = 10.0) -> bool:
    """Poll *condition* (a callable) until true or *timeout* passes (bounded, no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


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


def _hold_and_die(url: str, ttl: float, ready: object, tokens: object) -> None:
    locks = KeyedLock(PostgresBackend.from_url(url, ttl=ttl))
    lease = locks.acquire_sync("crash")
    tokens.put(lease.token)  # type: ignore[attr-defined]
    ready.set()  # type: ignore[attr-defined]
    time.sleep(600)


def test_a_sigkilled_holder_loses_the_key_within_its_ttl(server: PgServer) -> None:
    """The holder process is SIGKILLed while a waiter is already in line (no release, no
    NOTIFY ever comes): the waiter gets the key when the TTL runs out, as its acquire was told,
    not at its own 60 s timeout, with a higher token."""
    ttl = 1.0
    ready, tokens = ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_hold_and_die, args=(server.url, ttl, ready, tokens))
    holder.start()
    assert ready.wait(60)
    first = tokens.get(timeout=10)
    locks = KeyedLock(PostgresBackend.from_url(server.url))
    with pytest.raises(LockTimeout):
        locks.acquire_sync("crash", timeout=0)  # held by the live process
    os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
    killed = time.monotonic()
    lease = locks.acquire_sync("crash", timeout=60)
    assert time.monotonic() - killed < ttl + 1.0  # within its TTL (plus slack for CI)
    assert lease.token > first
    lease.release_sync()
    locks.close_sync()
    holder.join(10)


def _connections(server: PgServer, name: str) -> list[int]:
    rows = server.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))
    return [int(pid) for (pid,) in rows]  # type: ignore[call-overload]


def test_terminating_the_holders_connections_keeps_its_lease(server: PgServer) -> None:
    """``pg_terminate_backend`` of every connection of the holder's backend. Defined behaviour:
    a lease lives in a row, not in a session, so it survives; the holder's next renewal fails
    on the dead connection, retries within ttl/10 on a new one, and the lease never lapses
    (nobody else gets the key); its release then works. Had the renewal not reconnected, the
    lease would have been reported lost at its TTL (the renewer's rule)."""
    ttl = 1.5
    backend = PostgresBackend.from_url(server.url, ttl=ttl, application_name="holder")
    locks = KeyedLock(backend)
    other = KeyedLock(PostgresBackend.from_url(server.url))
    lease = locks.acquire_sync("terminated")
    assert _wait_for(lambda: _connections(server, "holder"))
    for pid in _connections(server, "holder"):
        server.execute("SELECT pg_terminate_backend(%s)", (pid,))
    first_expiry = lease.expires_at
    assert first_expiry is not None
    assert _wait_for(lambda: lease.expires_at > first_expiry + ttl, timeout=3 * ttl)  # type: ignore[operator]
    assert not lease.lost
    with pytest.raises(LockTimeout):
        other.acquire_sync("terminated", timeout=0)
    lease.release_sync()
    again = other.acquire_sync("terminated", timeout=0)
    again.release_sync()
    locks.close_sync()
    other.close_sync()


def test_terminating_a_waiters_listening_connection_still_hands_over(server: PgServer) -> None:
    """The waiter's process loses its LISTEN connection (``pg_terminate_backend``): the
    listener reconnects and wakes its waiters to try again; the waiter is granted the key at
    the release, well before its safety-net poll would matter (poll=30 s here)."""
    holder = KeyedLock(PostgresBackend.from_url(server.url))
    waiting = KeyedLock(PostgresBackend.from_url(server.url, poll=30.0, application_name="w"))
    lease = holder.acquire_sync("listen")
    granted: list[int] = []

    def wait() -> None:
        got = waiting.acquire_sync("listen", timeout=30)
        granted.append(got.token)
        got.release_sync()

    import threading

    thread = threading.Thread(target=wait)
    thread.start()
    assert _wait_for(lambda: holder.statistics("listen").waiting == 0 and _listening(server))
    for pid in _connections(server, "w"):
        server.execute("SELECT pg_terminate_backend(%s)", (pid,))
    started = time.monotonic()
    lease.release_sync()
    thread.join(30)
    assert granted
    assert granted[0] > lease.token
    assert time.monotonic() - started < 5.0
    holder.close_sync()
    waiting.close_sync()


def _listening(server: PgServer) -> bool:
    rows = server.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %%'")
    return bool(rows[0][0])


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
