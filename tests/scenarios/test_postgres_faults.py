"""Faults of processes, connections and the server on Postgres, against a real PostgreSQL the
tests start: a holder SIGKILLed or SIGSTOPped, ``pg_terminate_backend`` of a holder's or a
waiter's connections, a server restart with waiters queued. Bounded polls, never a fixed sleep.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
import time

import psycopg
import pytest

from keylock import KeyedLock, LeaseLost, LockTimeout, StaleToken
from keylock.backends import PostgresBackend
from keylock.fencing import fenced_update

from .._pg_server import PgServer, running_postgres

ctx = multiprocessing.get_context("forkserver")


@pytest.fixture
def server(postgres_server: PgServer) -> PgServer:
    postgres_server.flush()
    postgres_server.execute("DROP TABLE IF EXISTS invoices")
    return postgres_server


def _wait_for(condition: object, timeout: float = 10.0) -> bool:
    """Poll *condition* (a callable) until true or *timeout* passes (bounded, no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


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


def _listening(server: PgServer, name: str | None = None) -> bool:
    """Some session (of application *name*, if given) is LISTENing."""
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %%' "
        "AND application_name = coalesce(%s, application_name)",
        (name,),
    )
    return bool(rows[0][0])


# ----------------------------------------------------------------- frozen and restarted


def _hold_freeze_and_wake(url: str, ttl: float, ready: object, woke: object, out: object) -> None:
    """Hold the key, be frozen (SIGSTOP) by the parent, then, once told it was resumed: wait
    (bounded) to learn the lease is lost, try the fenced write, try to release; report."""
    put = out.put  # type: ignore[attr-defined]
    lost_calls: list[int] = []
    locks = KeyedLock(
        PostgresBackend.from_url(url, ttl=ttl), on_lost=lambda lease: lost_calls.append(1)
    )
    lease = locks.acquire_sync("invoice:7")
    put(("token", lease.token))
    ready.set()  # type: ignore[attr-defined]
    assert woke.wait(120)  # type: ignore[attr-defined]  # frozen somewhere in here
    learned = _wait_for(lambda: lease.lost and lost_calls, timeout=30)  # on_lost: another thread
    put(("lost", learned, len(lost_calls)))
    try:
        with psycopg.connect(url) as conn, conn.transaction():
            fenced_update(conn, "invoices", 7, lease.token, {"total": 100})
        put(("write", "accepted"))
    except StaleToken:
        put(("write", "StaleToken"))
    try:
        lease.release_sync()
        put(("release", "released"))
    except LeaseLost:
        put(("release", "LeaseLost"))
    locks.close_sync()


def test_a_sigstopped_holder_learns_it_lost_the_key_and_its_write_is_refused(
    server: PgServer,
) -> None:
    """The holder process is frozen (SIGSTOP: a GC pause, a stalled VM) while it holds the key:
    its renewer is frozen too, so the lease runs out at its TTL and a waiter in another
    process is granted the key with a higher token and writes with it. Resumed (SIGCONT), the
    old holder learns the lease is lost (``lease.lost``, ``on_lost`` once) at its renewer's
    next round, its fenced write in the same database raises StaleToken and changes nothing,
    and its release raises LeaseLost."""
    server.execute(
        "CREATE TABLE invoices (id int PRIMARY KEY, total int, fence bigint NOT NULL DEFAULT 0)"
    )
    server.execute("INSERT INTO invoices (id, total) VALUES (7, 0)")
    ttl = 1.0
    ready, woke, out = ctx.Event(), ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_hold_freeze_and_wake, args=(server.url, ttl, ready, woke, out))
    holder.start()
    try:
        assert ready.wait(60)
        kind, first = out.get(timeout=10)
        assert kind == "token"
        os.kill(holder.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        frozen = time.monotonic()
        locks = KeyedLock(PostgresBackend.from_url(server.url))
        lease = locks.acquire_sync("invoice:7", timeout=30)  # once the frozen lease runs out
        assert time.monotonic() - frozen < ttl + 2.0  # within its TTL (slack for CI)
        assert lease.token > first
        with psycopg.connect(server.url) as conn, conn.transaction():
            assert fenced_update(conn, "invoices", 7, lease.token, {"total": 200})
        os.kill(holder.pid, signal.SIGCONT)  # type: ignore[arg-type]
        woke.set()
        reports = {report[0]: report[1:] for report in (out.get(timeout=60) for _ in range(3))}
        assert reports == {
            "lost": (True, 1),
            "write": ("StaleToken",),
            "release": ("LeaseLost",),
        }
        assert server.execute("SELECT total, fence FROM invoices") == [(200, lease.token)]
        assert locks.statistics("invoice:7").token == lease.token  # still the live holder's
        lease.release_sync()
        locks.close_sync()
        holder.join(30)
        assert holder.exitcode == 0
    finally:
        if holder.is_alive():
            os.kill(holder.pid, signal.SIGCONT)  # type: ignore[arg-type]
            holder.kill()
            holder.join(10)


def _wait_in_line(url: str, name: str, record: object, grant_hold: float = 0.05) -> None:
    """A waiter in its own process: acquire (bounded), hold briefly, release; report each
    grant as (name, token, start, end) in time.monotonic(), or the error's class name."""
    put = record.put  # type: ignore[attr-defined]
    locks = KeyedLock(PostgresBackend.from_url(url, ttl=5.0))
    asked = time.monotonic()
    try:
        lease = locks.acquire_sync("restart", timeout=30)
    except Exception as exc:  # reported, and judged by the parent
        put((name, type(exc).__name__, asked, time.monotonic()))
        locks.close_sync()
        return
    start = time.monotonic()
    deadline = start + grant_hold
    while time.monotonic() < deadline:  # the section (a busy one: no fixed sleep)
        pass
    end = time.monotonic()
    try:
        lease.release_sync()
        outcome = "released"
    except Exception as exc:
        outcome = type(exc).__name__
    put((name, lease.token, start, end, outcome, asked))
    locks.close_sync()


def test_a_server_restart_with_waiters_queued_hands_the_key_on_once() -> None:
    """A holder and three waiting processes (queued in ``keylock_leases_queue``); then the
    server crashes and restarts (``immediate``: every session cut, the WAL replayed; the chaos
    suite restarts it ``fast`` too, with the history checker).
    With ``durable=True`` (the holder's: it makes the tables logged for every backend on
    them) leases and the line are rows, committed before the grant and the queueing were
    reported, so they survive: the holder's renewals and release reconnect; its release hands
    the key to the head of the line, each waiter's listener reconnects and wakes it. Every
    waiter gets the key (or a clear BackendUnavailable), one at a time, with rising tokens,
    none before the holder let go, none hanging past its timeout."""
    with running_postgres() as own:
        lost: list[int] = []
        # a 5 s TTL outlasts psycopg_pool's reconnection backoff (1 s, then 2 s...): with a
        # shorter one the lease may be reported lost (safe, but not what this test is about)
        # durable: the default's UNLOGGED tables are emptied by a crash, every lease lost
        # (tests/scenarios/test_postgres_unlogged.py); the holder makes them logged for all
        holder = KeyedLock(
            PostgresBackend.from_url(own.url, ttl=5.0, durable=True),
            on_lost=lambda lease: lost.append(1),
        )
        lease = holder.acquire_sync("restart")
        record: multiprocessing.Queue[tuple[object, ...]] = ctx.Queue()
        waiters = [
            ctx.Process(target=_wait_in_line, args=(own.url, f"w{i}", record)) for i in range(3)
        ]
        try:
            for proc in waiters:
                proc.start()
            # asked of another backend: the holder's own statistics count its local waiters
            watcher = KeyedLock(PostgresBackend.from_url(own.url))
            assert _wait_for(lambda: watcher.statistics("restart").waiting == 3, timeout=60)
            watcher.close_sync()
            own.restart("immediate")
            # the holder keeps its lease through the restart: its renewal reconnects
            renewed = lease.expires_at
            assert renewed is not None
            assert _wait_for(lambda: lease.expires_at > renewed, timeout=10)  # type: ignore[operator]
            assert not lease.lost
            released = time.monotonic()
            lease.release_sync()
            reports = [record.get(timeout=60) for _ in waiters]
            for proc in waiters:
                proc.join(30)
                assert proc.exitcode == 0
        finally:
            for proc in waiters:
                if proc.is_alive():
                    proc.kill()
                    proc.join(10)
            holder.close_sync()
    grants = sorted((r for r in reports if isinstance(r[1], int)), key=lambda r: r[2])
    errors = [r for r in reports if not isinstance(r[1], int)]
    assert all(r[1] == "BackendUnavailable" for r in errors), errors
    assert len(grants) >= 1
    assert all(r[4] == "released" for r in grants)
    assert grants[0][2] >= released  # nobody before the holder let go
    assert grants[0][1] > lease.token
    for earlier, later in itertools.pairwise(grants):  # one at a time, rising tokens
        assert later[2] >= earlier[3]
        assert later[1] > earlier[1]
    waited = [r[2] - r[5] if isinstance(r[1], int) else r[3] - r[2] for r in reports]
    assert max(waited) < 30 + 1.0  # nobody hung past its timeout
    assert lost == []


def _wait_named(url: str, name: str, out: object) -> None:
    locks = KeyedLock(PostgresBackend.from_url(url, application_name=name, poll=0.3))
    try:
        lease = locks.acquire_sync("cut", timeout=30)
    except Exception as exc:
        out.put((type(exc).__name__, time.monotonic()))  # type: ignore[attr-defined]
    else:
        out.put((lease.token, time.monotonic()))  # type: ignore[attr-defined]
        lease.release_sync()
    locks.close_sync()


def test_a_waiter_whose_connections_are_all_terminated_keeps_its_place(server: PgServer) -> None:
    """Every connection of a waiting process (its pool's and its LISTEN session) is ended by
    ``pg_terminate_backend``, five times over, while it waits (polling every 0.3 s, so its
    polls meet dead connections): it reconnects and keeps waiting, is never granted the key
    while the holder holds it, and gets it at the release, with a higher token."""
    holder = KeyedLock(PostgresBackend.from_url(server.url))
    watcher = KeyedLock(PostgresBackend.from_url(server.url))
    lease = holder.acquire_sync("cut")
    out: multiprocessing.Queue[tuple[object, float]] = ctx.Queue()
    proc = ctx.Process(target=_wait_named, args=(server.url, "cut-waiter", out))
    proc.start()
    try:
        assert _wait_for(lambda: watcher.statistics("cut").waiting == 1, timeout=60)
        for _ in range(5):
            assert _wait_for(lambda: _listening(server, "cut-waiter"), timeout=10)  # reconnected
            for pid in _connections(server, "cut-waiter"):
                server.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert out.empty()  # not granted while the holder holds it
        assert _wait_for(lambda: watcher.statistics("cut").waiting == 1, timeout=10)
        released = time.monotonic()
        lease.release_sync()
        token, granted = out.get(timeout=30)
        assert isinstance(token, int), token
        assert token > lease.token
        assert released <= granted < released + 5.0
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        holder.close_sync()
        watcher.close_sync()
