"""Permit views of a tiered backend, on an arbiter that is a memory permit table shared by
two "processes" (two backends): the in-process tier of a view is the memory permit table of
its shape, one process may hold several permits of one key, and both tiers are left empty by
releases, timeouts and cancellations. (The real arbiters, file/Redis/Postgres, are tested by
their own suites; this pins the generic part they all sit on.)"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from keylock import KeyedLock, LeaseLost, LimitMismatch, LockTimeout
from keylock.backends import Backend, MemoryBackend
from keylock.backends._tiered import Flow, Held, Step, Tier, TieredBackend
from keylock.backends._tieredpermits import TieredPermits, tiered_view
from keylock.backends.base import RW_LIMIT, Deadline, Grant, KeyStatistics, Waiter


class _Flow(Flow):
    def __init__(self, arbiter: Backend, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.arbiter = arbiter
        self.asked = False

    def next(self, now: float) -> Step | None:
        if self.grant is not None:
            return None
        if self.waiter.grant is not None:  # handed over by the arbiter: no polling
            self.grant = self.waiter.grant
            return None
        if not self.asked:
            return Step("step", None)
        self.asked = False
        return Step(None, self.deadline.until(self.waiter.retry_at, now))

    def on_reply(self, reply: object, now: float) -> None:
        if reply is not None:
            self.grant = reply  # type: ignore[assignment]
        else:
            self.asked = True

    def leaving(self) -> object | None:
        return "leave"


class Fake(TieredBackend):
    """A tiered backend whose arbiter is a MemoryBackend shared with other Fakes."""

    nonblocking_step = True

    def __init__(self, remote: MemoryBackend) -> None:
        self.remote = remote
        self._tier = Tier()

    @property
    def _arbiter(self) -> Backend:
        return self.remote

    def permits(self, limit: int, weight: int = 1) -> Backend:
        return tiered_view(self, FakePermits, limit, weight)

    def _flow(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        deadline: Deadline,
        waiter: Waiter,
        local: Grant,
    ) -> Flow:
        return _Flow(self._arbiter, key, owner, ttl, deadline, waiter, local)

    def _try_now(self, key: str, owner: bytes, ttl: float | None, local: Grant) -> Grant | None:
        grant = self._arbiter._try_acquire(key, owner, ttl, None)
        if grant is not None:
            flow = _Flow(self._arbiter, key, owner, ttl, None, None, local)
            flow.grant = grant
            self._adopt(flow)
        return grant

    def _trip_sync(self, flow: Flow, trip: object) -> object:
        arbiter = self._arbiter
        if trip == "step":
            return arbiter._try_acquire(flow.key, flow.owner, flow.ttl, flow.waiter)
        grant = arbiter._withdraw(flow.key, flow.waiter)
        if grant is not None:
            arbiter._discard_sync(flow.key, flow.owner, grant)
        return None

    def _end_sync(self, key: str, held: Held) -> bool:
        try:
            self._arbiter.release_sync(key, held.owner, held.token)
        except LeaseLost:
            return False
        return True

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._take_held(key, owner, token, pop=False)
        self._arbiter.extend_sync(key, owner, token, ttl)
        return self._extend_local(key, held, ttl)

    def _arbiter_statistics(self, key: str, local: KeyStatistics) -> KeyStatistics:
        found = self._arbiter.statistics(key)
        return KeyStatistics(key, found.held, found.token, found.owner, local.waiting, 0)


class FakePermits(TieredPermits, Fake):
    @property
    def _arbiter(self) -> Backend:
        return self._parent.remote.permits(*self.shape)  # type: ignore[attr-defined]


def _empty(*backends: Fake) -> bool:
    return all(len(b._tier.local) == 0 for b in backends) and all(
        not b._tier.permits(*shape).held and len(b._tier.permits(*shape).local) == 0
        for b in backends
        for shape in b._tier._permit_tiers
    )


def test_the_lock_path_keeps_its_keyed_by_key_held_map() -> None:
    remote = MemoryBackend()
    a = Fake(remote)
    locks = KeyedLock(a)
    lease = locks.acquire_sync("k")
    assert list(a._tier.held) == ["k"]
    sem = KeyedLock(a.permits(2))
    permit = sem.acquire_sync("k")  # another keyspace: granted beside the lock
    assert list(a._tier.held) == ["k"]
    assert list(a._tier.permits(2, 1).held) == [("k", permit.token)]
    lease.release_sync()
    permit.release_sync()
    assert len(remote) == 0
    assert _empty(a)


async def test_one_process_may_hold_several_permits_of_a_key() -> None:
    remote = MemoryBackend()
    a, b = Fake(remote), Fake(remote)
    sem_a, sem_b = KeyedLock(a.permits(3)), KeyedLock(b.permits(3))
    mine = [await sem_a.acquire("k") for _ in range(2)]
    theirs = await sem_b.acquire("k")
    assert sem_a.backend.statistics("k").holders == 2
    assert remote.permits(3).statistics("k").holders == 3
    with pytest.raises(LockTimeout):
        await sem_b.acquire("k", timeout=0)
    with pytest.raises(LockTimeout):
        await sem_b.acquire("k", timeout=0.02)
    waiting = asyncio.create_task(sem_b.acquire("k", timeout=10))
    while remote.permits(3).statistics("k").waiting < 1:
        await asyncio.sleep(0.001)
    await mine[0].release()
    got = await waiting  # handed over by the arbiter
    assert got.token > theirs.token > mine[1].token
    for lease in (mine[1], theirs, got):
        await lease.release()
    assert len(remote.permits(3)) == 0
    assert _empty(a, b)


async def test_rw_across_processes_and_within_one() -> None:
    remote = MemoryBackend()
    a, b = Fake(remote), Fake(remote)
    read_a = KeyedLock(a.permits(RW_LIMIT, 1))
    write_a = KeyedLock(a.permits(RW_LIMIT, RW_LIMIT))
    write_b = KeyedLock(b.permits(RW_LIMIT, RW_LIMIT))
    r = await read_a.acquire("doc")
    for writer in (write_a, write_b):  # in this process, and in the other one
        with pytest.raises(LockTimeout):
            await writer.acquire("doc", timeout=0.02)
    wb = asyncio.create_task(write_b.acquire("doc", timeout=10))
    while remote.permits(RW_LIMIT, 1).statistics("doc").waiting < 1:
        await asyncio.sleep(0.001)
    await r.release()
    w = await wb
    assert w.token > r.token
    with pytest.raises(LockTimeout):
        await read_a.acquire("doc", timeout=0.02)
    await w.release()
    assert len(remote.permits(2)) == 0
    assert _empty(a, b)


async def test_a_limit_mismatch_at_the_arbiter_leaves_nothing() -> None:
    remote = MemoryBackend()
    a, b = Fake(remote), Fake(remote)
    held = await KeyedLock(a.permits(3)).acquire("k")
    with pytest.raises(LimitMismatch):
        await KeyedLock(b.permits(2)).acquire("k", timeout=1)
    with pytest.raises(LimitMismatch):
        KeyedLock(b.permits(2)).acquire_sync("k", timeout=1)
    await held.release()
    assert _empty(a, b)
    assert len(remote.permits(3)) == 0


async def test_cancel_and_lost_release_leave_both_tiers_empty() -> None:
    remote = MemoryBackend()
    a, b = Fake(remote), Fake(remote)
    sem_a, sem_b = KeyedLock(a.permits(1)), KeyedLock(b.permits(1))
    held = await sem_a.acquire("k", ttl=0.2)
    waiting = asyncio.create_task(sem_b.acquire("k"))
    while remote.permits(1).statistics("k").waiting < 1:
        await asyncio.sleep(0.001)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    deadline = time.monotonic() + 10
    while (taken := await _try(sem_b)) is None:  # bounded poll: the TTL runs out
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert taken.took_over
    with pytest.raises(LeaseLost):
        await held.release()
    await taken.extend(5.0)
    await taken.release()
    assert _empty(a, b)
    assert len(remote.permits(1)) == 0


async def _try(locks: KeyedLock) -> object:
    try:
        return await locks.acquire("k", timeout=0)
    except LockTimeout:
        return None


def test_threads_of_two_processes_never_exceed_the_limit() -> None:
    remote = MemoryBackend()
    a, b = Fake(remote), Fake(remote)
    inside = most = 0
    mutex = threading.Lock()

    def work(locks: KeyedLock) -> None:
        nonlocal inside, most
        for _ in range(30):
            with locks.sync("k", timeout=20):
                with mutex:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0)
                with mutex:
                    inside -= 1

    threads = [
        threading.Thread(target=work, args=(KeyedLock(backend.permits(3)),))
        for backend in (a, b, a, b, a, b)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most == 3
    assert _empty(a, b)
    assert len(remote.permits(3)) == 0


def test_a_view_reads_its_parent_and_closes_nothing() -> None:
    remote = MemoryBackend()
    a = Fake(remote)
    view = a.permits(2)
    assert view is a.permits(2, 1)
    assert isinstance(view, FakePermits)
    assert view.remote is remote  # type: ignore[attr-defined]
    view.close_sync()
    asyncio.run(view.close())
    with pytest.raises(TypeError, match="already a permit view"):
        view.permits(3)
    assert "permits(2, 1)" in repr(view)
