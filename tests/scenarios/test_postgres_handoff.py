"""A Postgres hand-off carries its grant in the NOTIFY: the waiter adopts the key without an
acquire round trip of its own, its renewer extends the short claim window to its TTL, and a
key handed to a waiter that died lapses after the claim window."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest

from keylock import KeyedLock, Lease, LockTimeout
from keylock.backends import PostgresBackend

from .._pg_server import PgServer

ctx = multiprocessing.get_context("forkserver")


def _wait_for(condition: object, timeout: float = 10.0) -> bool:
    """Poll *condition* (a callable) until true or *timeout* passes (bounded, no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _in_line(server: PgServer, key: str) -> int:
    rows = server.execute(
        "SELECT count(*) FROM keylock_leases_queue WHERE key = %s", (key.encode(),)
    )
    return int(rows[0][0])  # type: ignore[call-overload]


def _listening(backend: PostgresBackend) -> bool:
    listener = backend._waiting._listener
    return listener is not None and listener.ready.is_set()


def test_a_handed_key_is_adopted_without_a_round_trip(postgres_server: PgServer) -> None:
    """A waiter in line (its listener LISTENing, its place taken): the holder's release hands
    it the key, and the waiter is granted it from the NOTIFY alone, without sending an acquire
    of its own; it did not take the key over, and its token is the hand-off's, higher than
    the holder's. Failed before the fix: the NOTIFY only woke the waiter, whose acquire then
    claimed the key (one more round trip per hand-off)."""
    server = postgres_server
    server.flush()
    holder = KeyedLock(PostgresBackend.from_url(server.url))
    backend = PostgresBackend.from_url(server.url, poll=30.0)
    trips: list[object] = []
    trip_sync = backend._trip_sync

    def counted(flow: object, trip: object) -> object:
        trips.append(trip)
        return trip_sync(flow, trip)  # type: ignore[arg-type]

    backend._trip_sync = counted  # type: ignore[method-assign]
    waiter = KeyedLock(backend)
    lease = holder.acquire_sync("handed")
    got: list[Lease] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire_sync("handed", timeout=30)))
    thread.start()
    try:
        # queued, then the listener came up and woke it once more (a hand-off may be missed)
        assert _wait_for(lambda: _listening(backend) and len(trips) >= 2)
        before = len(trips)
        lease.release_sync()
        thread.join(10)
        assert got
        assert len(trips) == before  # no acquire of its own: the NOTIFY carried the grant
        assert got[0].token > lease.token
        assert not got[0].took_over
        with pytest.raises(LockTimeout):
            holder.acquire_sync("handed", timeout=0)
        got[0].release_sync()
    finally:
        if thread.is_alive():
            lease.release_sync()
            thread.join(30)
        holder.close_sync()
        waiter.close_sync()


def test_a_handed_lease_outlives_its_claim_window(postgres_server: PgServer) -> None:
    """A waiter polling every 0.2 s is handed the key for a claim window of 1.6 s (its stay in
    line); its renewer extends the lease to its 30 s TTL within a third of that window, so it
    is never lost, and nobody else gets the key after the window."""
    server = postgres_server
    server.flush()
    holder = KeyedLock(PostgresBackend.from_url(server.url))
    waiter = KeyedLock(PostgresBackend.from_url(server.url, poll=0.2))
    lease = holder.acquire_sync("window")
    got: list[Lease] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire_sync("window", timeout=30)))
    thread.start()
    try:
        assert _wait_for(lambda: _in_line(server, "window") == 1)
        lease.release_sync()
        thread.join(10)
        assert got
        handed = got[0]
        assert _wait_for(lambda: (handed.expires_at or 0) - time.time() > 10)  # renewed
        assert not handed.lost
        with pytest.raises(LockTimeout):
            holder.acquire_sync("window", timeout=0)
        handed.release_sync()
    finally:
        if thread.is_alive():
            lease.release_sync()
            thread.join(30)
        holder.close_sync()
        waiter.close_sync()


def _wait_then_freeze(url: str, queued: object) -> None:
    locks = KeyedLock(PostgresBackend.from_url(url, poll=1.0))
    thread = threading.Thread(target=lambda: locks.acquire_sync("dead-waiter", timeout=600))
    thread.start()
    while locks.statistics("dead-waiter").waiting < 1:
        time.sleep(0.01)
    queued.set()  # type: ignore[attr-defined]
    thread.join()


def test_a_key_handed_to_a_dead_waiter_lapses_after_its_claim_window(
    postgres_server: PgServer,
) -> None:
    """The head of the line is SIGKILLed just before the release hands it the key: nobody
    adopts it, and the next acquirer gets it once the claim window (4 s here: the waiter's
    stay in line) has run out, long before the 30 s TTL, taking it over."""
    server = postgres_server
    server.flush()
    holder = KeyedLock(PostgresBackend.from_url(server.url))
    lease = holder.acquire_sync("dead-waiter")
    queued = ctx.Event()
    proc = ctx.Process(target=_wait_then_freeze, args=(server.url, queued))
    proc.start()
    try:
        assert queued.wait(60)
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(10)
        lease.release_sync()  # handed to the dead waiter, for its claim window
        released = time.monotonic()
        owner = server.execute("SELECT owner FROM keylock_leases WHERE key = 'dead-waiter'")
        assert owner[0][0] is not None  # handed on (not freed: the waiter was still in line)
        after = holder.acquire_sync("dead-waiter", timeout=10)
        assert time.monotonic() - released < 4.0 + 1.5
        assert after.took_over
        assert after.token > lease.token
        after.release_sync()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        holder.close_sync()
