"""Postgres semaphores and RW locks across clients and processes, against a real PostgreSQL
the tests start: exclusion counted by holders, hand-off by NOTIFY without polling (several
readers at once), a SIGKILLed holder's permit lapsing at its TTL, ``pg_terminate_backend`` of
a holder's and of a waiter's connections, a lost permit reported, nothing left behind by a
cancelled waiter. Bounded polls, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from keylock import (
    KeyedLock,
    KeyedRWLock,
    KeyedSemaphore,
    LeaseLost,
    LimitMismatch,
    LockTimeout,
)
from keylock.backends import PostgresBackend
from keylock.backends.base import RW_LIMIT

from .._pg_server import PgServer
from .test_rw_writer_fairness import _readers_granted_before_the_writer

ctx = multiprocessing.get_context("forkserver")


@pytest.fixture
def server(postgres_server: PgServer) -> Iterator[PgServer]:
    postgres_server.flush()
    yield postgres_server
    postgres_server.flush()


def _wait_for(condition: object, timeout: float = 10.0) -> bool:
    """Poll *condition* (a callable) until true or *timeout* passes (bounded, no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _count(server: PgServer, table: str) -> int:
    """Permits held (``permits``: a free slot has no owner) or waiters in line."""
    rows = server.execute(f"SELECT count(owner) FROM keylock_leases_{table}")
    return int(rows[0][0])  # type: ignore[call-overload]


def _sem(url: str, limit: int, weight: int = 1, **options: object) -> KeyedLock:
    return KeyedLock(PostgresBackend.from_url(url, **options).permits(limit, weight))  # type: ignore[arg-type]


def _close(*locks: KeyedLock) -> None:
    for lock in locks:
        lock.backend._parent.close_sync()  # type: ignore[attr-defined]


# ------------------------------------------------------------------- exclusion across processes


def _work(url: str, limit: int, weight: int, rounds: int, state: object, start: object) -> None:
    """Take the permit *rounds* times; inside, count the holders of each weight."""
    locks = _sem(url, limit, weight)
    cur, readers, writers, worst, bad = state  # type: ignore[misc]
    start.wait(30)  # type: ignore[attr-defined]
    for _ in range(rounds):
        with locks.sync("k", timeout=60):
            with cur.get_lock():
                cur.value += 1
                worst.value = max(worst.value, cur.value)
                if weight == limit:
                    writers.value += 1
                else:
                    readers.value += 1
                if writers.value > 1 or (writers.value and readers.value):
                    bad.value += 1
            time.sleep(0.002)  # a critical section long enough for others to try to enter
            with cur.get_lock():
                cur.value -= 1
                if weight == limit:
                    writers.value -= 1
                else:
                    readers.value -= 1
    _close(locks)


def _run_processes(server: PgServer, shapes: list[tuple[int, int]], rounds: int) -> list[int]:
    state = [ctx.Value("i", 0) for _ in range(5)]
    start = ctx.Event()
    procs = [
        ctx.Process(target=_work, args=(server.url, limit, weight, rounds, state, start))
        for limit, weight in shapes
    ]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    return [int(value.value) for value in state]  # cur, readers, writers, worst, bad


def test_four_processes_never_exceed_a_semaphores_limit(server: PgServer) -> None:
    """Limit 2, four processes of one permit each at a time: never more than 2 inside (two
    at once across clients is shown deterministically by the hand-off tests below)."""
    cur, _, _, worst, bad = _run_processes(server, [(2, 1)] * 4, rounds=15)
    assert (cur, bad) == (0, 0)
    assert 1 <= worst <= 2
    assert _count(server, "permits") == 0
    assert _count(server, "permit_queue") == 0


def test_readers_and_writers_in_processes_never_overlap(server: PgServer) -> None:
    """Three reader processes and two writer processes of one RW lock: never a writer beside
    anyone (that readers share it is shown, deterministically, by the hand-off test below)."""
    shapes = [(RW_LIMIT, 1)] * 3 + [(RW_LIMIT, RW_LIMIT)] * 2
    cur, readers, writers, _, bad = _run_processes(server, shapes, rounds=10)
    assert (cur, readers, writers, bad) == (0, 0, 0, 0)


async def test_tasks_of_two_clients_never_exceed_the_limit(server: PgServer) -> None:
    """Tasks on two clients (two "hosts"), async flavour: at most 3 inside at once, and 3 do
    get in together (until they have, a holder stays inside, a bounded 10 s at most: a fixed
    2 ms section missed it on a loaded machine, on the previous code too)."""
    clients = [_sem(server.url, 3) for _ in range(2)]
    inside = worst = 0
    deadline = time.monotonic() + 10.0

    async def work(locks: KeyedLock) -> None:
        nonlocal inside, worst
        for _ in range(5):
            async with locks("k", timeout=30):
                inside += 1
                worst = max(worst, inside)
                await asyncio.sleep(0.002)
                while worst < 3 and time.monotonic() < deadline:
                    await asyncio.sleep(0.001)
                inside -= 1

    await asyncio.gather(*(work(clients[i % 2]) for i in range(8)))
    assert worst == 3
    for locks in clients:
        await locks.backend._parent.close()  # type: ignore[attr-defined]


# --------------------------------------------------------------------- hand-off without polling


def test_a_release_hands_the_permit_over_without_polling(server: PgServer) -> None:
    """The waiter's safety-net poll is 30 s: it still gets the permit at once after the
    release (NOTIFYed with the grant), with a higher token, not taken over."""
    holder, waiting = _sem(server.url, 2), _sem(server.url, 2, poll=30.0)
    first, second = holder.acquire_sync("k"), holder.acquire_sync("k")
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(waiting.acquire_sync("k", timeout=30)))
    thread.start()
    assert _wait_for(lambda: _count(server, "permit_queue") == 1)
    released = time.monotonic()
    first.release_sync()
    thread.join(30)
    assert time.monotonic() - released < 2.0
    (lease,) = got
    assert lease.token > second.token  # type: ignore[attr-defined]
    assert not lease.took_over  # type: ignore[attr-defined]
    lease.release_sync()  # type: ignore[attr-defined]
    second.release_sync()
    _close(holder, waiting)


def test_a_writers_release_hands_the_lock_to_every_reader_behind_it(server: PgServer) -> None:
    """Two readers of another client queued behind a writer (poll 30 s) are both handed the
    lock at the writer's release, together."""
    writer = _sem(server.url, RW_LIMIT, RW_LIMIT)
    readers = _sem(server.url, RW_LIMIT, poll=30.0)
    held = writer.acquire_sync("doc")
    got: list[object] = []
    both = threading.Barrier(3)

    def read() -> None:
        lease = readers.acquire_sync("doc", timeout=30)
        got.append(lease)
        both.wait(30)  # both readers hold it at once
        lease.release_sync()

    threads = [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert _wait_for(lambda: _count(server, "permit_queue") == 2)
    released = time.monotonic()
    held.release_sync()
    both.wait(30)
    assert time.monotonic() - released < 2.0
    for thread in threads:
        thread.join(30)
    assert all(lease.token > held.token for lease in got)  # type: ignore[attr-defined]
    _close(writer, readers)


def test_a_waiting_writer_keeps_later_readers_out(server: PgServer) -> None:
    """FIFO across weights, across clients: a reader that arrives after a waiting writer waits
    too (a try is refused), and gets in only after the writer."""
    readers, writers = _sem(server.url, RW_LIMIT), _sem(server.url, RW_LIMIT, RW_LIMIT)
    first = readers.acquire_sync("doc")
    order: list[str] = []
    w = threading.Thread(target=lambda: _use(writers, "w", order))
    w.start()
    assert _wait_for(lambda: _count(server, "permit_queue") == 1)
    with pytest.raises(LockTimeout):
        readers.acquire_sync("doc", timeout=0)
    other = _sem(server.url, RW_LIMIT)
    r = threading.Thread(target=lambda: _use(other, "r", order))
    r.start()
    assert _wait_for(lambda: _count(server, "permit_queue") == 2)
    first.release_sync()
    w.join(30)
    r.join(30)
    assert order == ["w", "r"]
    _close(readers, writers, other)


def _use(locks: KeyedLock, name: str, order: list[str]) -> None:
    with locks.sync("doc", timeout=30):
        order.append(name)


# ----------------------------------------------------------------------------- faults


def _hold_and_die(url: str, ttl: float, ready: object, tokens: object) -> None:
    locks = _sem(url, 2, ttl=ttl)
    lease = locks.acquire_sync("crash")
    tokens.put(lease.token)  # type: ignore[attr-defined]
    ready.set()  # type: ignore[attr-defined]
    time.sleep(600)


def test_a_sigkilled_holders_permit_lapses_at_its_ttl(server: PgServer) -> None:
    """Limit 2: one permit held here, one by a process that is SIGKILLed while a waiter is in
    line (no release, no NOTIFY ever comes): the waiter gets the dead holder's room when its
    TTL runs out, taken over, with a higher token; the live permit is untouched."""
    ttl = 1.0
    ready, tokens = ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_hold_and_die, args=(server.url, ttl, ready, tokens))
    holder.start()
    assert ready.wait(60)
    first = tokens.get(timeout=10)
    locks = _sem(server.url, 2)
    mine = locks.acquire_sync("crash")
    with pytest.raises(LockTimeout):
        locks.acquire_sync("crash", timeout=0)
    os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
    killed = time.monotonic()
    lease = locks.acquire_sync("crash", timeout=60)
    assert time.monotonic() - killed < ttl + 1.0  # within its TTL (plus slack for CI)
    assert lease.token > max(first, mine.token)
    assert lease.took_over
    assert not mine.lost
    lease.release_sync()
    mine.release_sync()
    _close(locks)
    holder.join(10)


def _connections(server: PgServer, name: str) -> list[int]:
    rows = server.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))
    return [int(pid) for (pid,) in rows]  # type: ignore[call-overload]


def test_terminating_the_holders_connections_keeps_its_permit(server: PgServer) -> None:
    """``pg_terminate_backend`` of every connection of the holder: a permit lives in a row,
    not a session; its renewals reconnect and it never lapses (the other client stays out)."""
    ttl = 1.5
    holder = _sem(server.url, 1, ttl=ttl, application_name="permit-holder")
    other = _sem(server.url, 1)
    lease = holder.acquire_sync("terminated")
    assert _wait_for(lambda: _connections(server, "permit-holder"))
    for pid in _connections(server, "permit-holder"):
        server.execute("SELECT pg_terminate_backend(%s)", (pid,))
    first_expiry = lease.expires_at
    assert first_expiry is not None
    assert _wait_for(lambda: lease.expires_at > first_expiry + ttl, timeout=3 * ttl)  # type: ignore[operator]
    assert not lease.lost
    with pytest.raises(LockTimeout):
        other.acquire_sync("terminated", timeout=0)
    lease.release_sync()
    other.acquire_sync("terminated", timeout=0).release_sync()
    _close(holder, other)


def _listening(locks: KeyedLock) -> bool:
    """The listener of *locks*' backend is LISTENing (it starts once a waiter is in line)."""
    listener = locks.backend._parent._waiting._listener  # type: ignore[attr-defined]
    return listener is not None and bool(listener.ready.is_set())


def test_terminating_a_waiters_connections_still_hands_over(server: PgServer) -> None:
    """The waiter's process loses its LISTEN connection and its pool's: the listener
    reconnects and its waiters try again; the permit is handed over at the release, long
    before the 30 s safety-net poll."""
    holder = _sem(server.url, 1)
    waiting = _sem(server.url, 1, poll=30.0, application_name="permit-waiter")
    lease = holder.acquire_sync("listen")
    got: list[int] = []

    def wait() -> None:
        with waiting.sync("listen", timeout=30) as mine:
            got.append(mine.token)

    thread = threading.Thread(target=wait)
    thread.start()
    assert _wait_for(lambda: _count(server, "permit_queue") == 1)
    assert _wait_for(lambda: _listening(waiting))
    for pid in _connections(server, "permit-waiter"):
        server.execute("SELECT pg_terminate_backend(%s)", (pid,))
    released = time.monotonic()
    lease.release_sync()
    thread.join(30)
    assert got
    assert got[0] > lease.token
    assert time.monotonic() - released < 5.0
    _close(holder, waiting)


def test_a_permit_taken_from_its_holder_is_reported_lost(server: PgServer) -> None:
    """An operator (or a crash-restart) ends the permit's row: the auto-renewer finds it gone
    within a third of the TTL, the lease says so, and its release raises LeaseLost."""
    locks = _sem(server.url, 2, ttl=0.9)
    lease = locks.acquire_sync("k")
    server.execute("DELETE FROM keylock_leases_permits")
    assert _wait_for(lambda: lease.lost, timeout=5)
    with pytest.raises(LeaseLost):
        lease.release_sync()
    _close(locks)


def test_auto_renew_keeps_a_permit_past_its_ttl(server: PgServer) -> None:
    locks, other = _sem(server.url, 1, ttl=0.6), _sem(server.url, 1)
    lease = locks.acquire_sync("k")
    first_expiry = lease.expires_at
    assert first_expiry is not None
    assert _wait_for(lambda: lease.expires_at > first_expiry + 1.0, timeout=5)  # type: ignore[operator]
    assert not lease.lost
    with pytest.raises(LockTimeout):
        other.acquire_sync("k", timeout=0)
    lease.release_sync()
    _close(locks, other)


# ------------------------------------------------------------------- limits and cleanup


def test_two_clients_disagreeing_about_the_limit_never_exceed_either(server: PgServer) -> None:
    three, two = _sem(server.url, 3), _sem(server.url, 2)
    leases = [three.acquire_sync("k") for _ in range(3)]
    with pytest.raises(LimitMismatch, match="semaphore of limit 3"):
        two.acquire_sync("k", timeout=5)
    assert _count(server, "permit_queue") == 0
    for lease in leases:
        lease.release_sync()
    two.acquire_sync("k", timeout=0).release_sync()  # nobody holds: the new limit is recorded
    _close(three, two)


async def test_a_cancelled_waiter_leaves_nothing_behind(server: PgServer) -> None:
    holder, waiting = _sem(server.url, 1), _sem(server.url, 1)
    lease = await holder.acquire("k")
    task = asyncio.ensure_future(waiting.acquire("k", timeout=30))
    assert await asyncio.to_thread(_wait_for, lambda: _count(server, "permit_queue") == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _count(server, "permit_queue") == 0
    await lease.release()
    assert _count(server, "permits") == 0
    stats = waiting.backend.statistics("k")
    assert (stats.held, stats.waiting, stats.holders) == (False, 0, 0)
    for locks in (holder, waiting):
        await locks.backend._parent.close()  # type: ignore[attr-defined]


def test_views_are_cached_and_closing_one_leaves_the_parent_open(server: PgServer) -> None:
    backend = PostgresBackend.from_url(server.url)
    view = backend.permits(3)
    assert view is backend.permits(3, 1)
    assert view is not backend.permits(RW_LIMIT)
    assert repr(view).endswith(".permits(3, 1)")
    view.close_sync()
    KeyedLock(view).acquire_sync("k", timeout=0).release_sync()
    with pytest.raises(ValueError, match="weight 4 exceeds limit 3"):
        backend.permits(3, 4)
    backend.close_sync()


def test_statistics_count_the_holders_of_every_client(server: PgServer) -> None:
    a, b = _sem(server.url, 3), _sem(server.url, 3)
    la, lb = a.acquire_sync("k"), b.acquire_sync("k")
    mine = a.backend.statistics("k")  # a holder sees the server's count, not only its own
    assert (mine.held, mine.token, mine.holders) == (True, lb.token, 2)
    seen = PostgresBackend.from_url(server.url)
    stats = seen.permits(3).statistics("k")
    assert (stats.held, stats.token, stats.owner, stats.holders) == (True, lb.token, lb.owner, 2)
    la.release_sync()
    lb.release_sync()
    seen.close_sync()
    _close(a, b)


class _SplitRW:
    """An RW lock whose readers are one client and whose writer is another (two hosts): the
    order between them is the server's alone (each client's in-process line sees one mode)."""

    def __init__(self, readers: KeyedRWLock, writer: KeyedRWLock) -> None:
        self.acquire_read = readers.acquire_read
        self.acquire_write = writer.acquire_write
        self.statistics = readers.statistics


async def test_a_writer_on_another_host_is_not_starved_by_a_stream_of_readers(
    server: PgServer,
) -> None:
    """The writer-fairness scenario (tests/scenarios/test_rw_writer_fairness.py) with the
    readers on one client and the writer on another: no reader that arrived after the
    waiting writer is granted before it."""
    readers = KeyedRWLock(PostgresBackend.from_url(server.url))
    writer = KeyedRWLock(PostgresBackend.from_url(server.url))
    split = _SplitRW(readers, writer)
    assert await _readers_granted_before_the_writer(split) == 0  # type: ignore[arg-type]
    await readers.close()
    await writer.close()


def test_keyed_semaphore_on_postgres(server: PgServer) -> None:
    """The public API over the backend: KeyedSemaphore's two leases, a third refused, tokens
    from one counter; close() closes the backend it was given."""
    backend = PostgresBackend.from_url(server.url)
    sem = KeyedSemaphore(backend, limit=2, namespace="api")
    with sem.sync("acme", timeout=5) as first, sem.sync("acme", timeout=5) as second:
        assert second.token > first.token
        assert sem.statistics("acme").holders == 2
        with pytest.raises(LockTimeout):
            sem.acquire_sync("acme", timeout=0)
    sem.close_sync()
    assert backend._closed
