"""A closed PostgresBackend opens no pool again: a call still in flight when it closed fails."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from keylock import BackendUnavailable, KeyedLock
from keylock.backends import PostgresBackend

from .._pg_server import PgServer


async def test_a_waiter_left_running_past_close_opens_no_pool(postgres_server: PgServer) -> None:
    """A waiter still queued when its backend closes (a test's gather failed, a shutdown that
    did not wait for its tasks) makes its next trip after close(). That trip opened a new
    pool for the loop, which nothing closed: at the loop's end a pool worker caught the
    cancel while connecting and then waited forever (a 25-minute hang in a test teardown).
    On the old code the waiter got the key through the new pool (checked); and, when its
    listener was still running at the release, from the release's message with no trip at
    all (a key then held by nobody who renews or releases it: the last check fails)."""
    postgres_server.flush()
    holder = PostgresBackend.from_url(postgres_server.url)
    waiter = PostgresBackend.from_url(postgres_server.url, poll=0.05)
    try:
        held = await KeyedLock(holder).acquire("k")
        waiting = asyncio.create_task(KeyedLock(waiter).acquire("k", timeout=30))
        for _ in range(500):  # bounded: until the waiter is in line at the server
            if postgres_server.execute("SELECT count(*) FROM keylock_leases_queue")[0][0]:
                break
            await asyncio.sleep(0.01)
        await waiter.close()
        await held.release()
        with pytest.raises(BackendUnavailable, match="closed"):
            await asyncio.wait_for(waiting, 30)
        assert not waiter._connections._async_wires  # no pool left open for this loop
        # nobody holds the key: the closed backend's waiter adopted no grant (a refresh of its
        # place sent just before the close may outlive the close's LEAVE: such a place lapses
        # within its stay window, 3 polls + 1 s, as a dead waiter's does)
        again = await KeyedLock(holder).acquire("k", timeout=10)
        await again.release()
    finally:
        await holder.close()
        await waiter.close()


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):  # bounded: 10 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened within 10 s")


@pytest.mark.parametrize("flavour", ["async", "sync"])
async def test_close_takes_its_waiters_out_of_the_line(
    postgres_server: PgServer, flavour: str
) -> None:
    """A backend closed while its callers wait in the server's line takes them out of it at
    once (a release then hands the key to nobody gone) and they raise BackendUnavailable
    without waiting for their timeout. The waiter's poll is 30 s, so no refresh of its place
    is in flight at the close. On the old code its place stayed until it lapsed (the count
    check fails) and the waiter slept on."""
    postgres_server.flush()
    holder = PostgresBackend.from_url(postgres_server.url)
    waiter = PostgresBackend.from_url(postgres_server.url, poll=30)
    waiting_locks = KeyedLock(waiter)
    try:
        held = await KeyedLock(holder).acquire("k")
        if flavour == "async":
            waiting = asyncio.ensure_future(waiting_locks.acquire("k", timeout=60))
        else:
            waiting = asyncio.ensure_future(
                asyncio.to_thread(waiting_locks.acquire_sync, "k", timeout=60)
            )

        def queued() -> bool:
            line = postgres_server.execute("SELECT count(*) FROM keylock_leases_queue")[0][0]
            listener = waiter._waiting._listener
            return bool(line) and listener is not None and listener.ready.is_set()

        await _until(queued)
        await waiter.close()
        assert postgres_server.execute("SELECT count(*) FROM keylock_leases_queue")[0][0] == 0
        with pytest.raises(BackendUnavailable, match="closed"):
            await asyncio.wait_for(waiting, 30)
        await held.release()
        again = await KeyedLock(holder).acquire("k", timeout=0)
        await again.release()
    finally:
        await holder.close()
        await waiter.close()
