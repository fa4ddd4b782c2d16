"""A Postgres holder's release survives the death of its pooled connection: it is sent again on
a new connection, and its answer is true (a release that ran before its reply was lost is
"released", not a false LeaseLost)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from keylock import KeyedLock, Lease
from keylock.backends import PostgresBackend

from .._pg_server import PgServer, running_postgres


def _wait_for(condition: object, timeout: float = 10.0) -> bool:
    """Poll *condition* (a callable) until true or *timeout* passes (bounded, no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _sessions(server: PgServer, name: str) -> list[int]:
    rows = server.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))
    return [int(pid) for (pid,) in rows]  # type: ignore[call-overload]


def test_a_release_after_a_crash_restart_frees_the_key_at_once() -> None:
    """The server crashes and restarts (``immediate``) while a sync and an async holder hold
    their keys (no auto-renew, so the release is the first statement after the crash): each
    release meets its pooled connection dead, is sent again on a new one, and frees the key
    at once: the next acquire is granted without waiting for the 30 s TTL, and did not take
    it over. Failed before the fix: the release was never sent again (BackendUnavailable,
    the key held until its TTL; 20 of 20 holders in the chaos suite's immediate row)."""
    with running_postgres() as own:
        # durable: a crash may forget a grant committed without the WAL flush (the default),
        # and then the release rightly says lost; this test is about the dead connection
        holder = KeyedLock(
            PostgresBackend.from_url(own.url, ttl=30.0, auto_renew=False, durable=True)
        )
        other = KeyedLock(PostgresBackend.from_url(own.url))

        async def scenario() -> None:
            sync_lease = await asyncio.to_thread(holder.acquire_sync, "sync-held")
            async_lease = await holder.acquire("async-held")
            await asyncio.to_thread(own.restart, "immediate")
            await asyncio.to_thread(sync_lease.release_sync)
            await async_lease.release()
            for key, lease in (("sync-held", sync_lease), ("async-held", async_lease)):
                after = await asyncio.to_thread(other.acquire_sync, key, timeout=0)
                assert after.token > lease.token
                assert not after.took_over
                await asyncio.to_thread(after.release_sync)

        try:
            asyncio.run(scenario())
        finally:
            holder.close_sync()
            other.close_sync()


@pytest.mark.parametrize("waiter", [False, True], ids=["free", "handed-on"])
def test_a_release_whose_reply_was_lost_answers_released(
    postgres_server: PgServer, waiter: bool
) -> None:
    """The holder's release ran at the server (here: the same statement, sent for it) but its
    reply never came back (its connection is then terminated): the backend sends it again on
    a new connection, and the repeat finds its own release mark and answers "released" (no
    LeaseLost), the key free, or handed to the waiter in line (who did not take it over).
    Failed before the fix: the repeat found the key not its own and raised LeaseLost (or the
    dead connection raised BackendUnavailable)."""
    server = postgres_server
    server.flush()
    holder = KeyedLock(PostgresBackend.from_url(server.url, application_name="lost-reply"))
    other = KeyedLock(PostgresBackend.from_url(server.url))
    lease = holder.acquire_sync("lost-reply")
    got: list[Lease] = []
    thread = threading.Thread(target=lambda: got.append(other.acquire_sync("lost-reply")))
    try:
        if waiter:
            thread.start()
            assert _wait_for(lambda: other.statistics("lost-reply").waiting == 1)
        assert _wait_for(lambda: _sessions(server, "lost-reply"))
        # the first attempt, as it ran at the server
        first = server.execute(
            "SELECT keylock_leases_release(%s, %s)", (b"lost-reply", lease._owner)
        )
        assert first == [(True,)]
        for pid in _sessions(server, "lost-reply"):  # its reply lost with its connection
            server.execute("SELECT pg_terminate_backend(%s)", (pid,))
        lease.release_sync()  # no LeaseLost
        if waiter:
            thread.join(10)
            assert got
            assert got[0].token > lease.token
            assert not got[0].took_over
            got[0].release_sync()
        else:
            after = other.acquire_sync("lost-reply", timeout=0)
            assert not after.took_over
            after.release_sync()
    finally:
        if thread.is_alive():
            thread.join(30)
        holder.close_sync()
        other.close_sync()
