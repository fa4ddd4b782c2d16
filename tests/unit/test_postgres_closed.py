"""A closed PostgresBackend opens no pool again: a call still in flight when it closed fails."""

from __future__ import annotations

import asyncio

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
        # the close took its waiter out of the server's line: the release hands it nothing
        assert postgres_server.execute("SELECT count(*) FROM keylock_leases_queue")[0][0] == 0
        await held.release()
        with pytest.raises(BackendUnavailable, match="closed"):
            await asyncio.wait_for(waiting, 30)
        assert not waiter._connections._async_wires  # no pool left open for this loop
        # nobody holds the key: the closed backend's waiter adopted no grant
        again = await KeyedLock(holder).acquire("k", timeout=0)
        await again.release()
    finally:
        await holder.close()
        await waiter.close()
