"""KeyedSemaphore and KeyedRWLock: KeyedLock's surface over permit views, and validation."""

from __future__ import annotations

import asyncio
import threading

import pytest

from keylock import KeyedLock, KeyedRWLock, KeyedSemaphore, LimitMismatch, LockTimeout
from keylock.backends import MemoryBackend


@pytest.mark.parametrize("limit", [True, False, 2.0, "3", None])
def test_limit_must_be_an_int(limit: object) -> None:
    with pytest.raises(TypeError, match="positive int"):
        KeyedSemaphore(limit=limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [0, -3, 1 << 30])
def test_limit_must_be_in_range(limit: int) -> None:
    with pytest.raises(ValueError, match="between 1 and"):
        KeyedSemaphore(limit=limit)


def test_a_foreign_backend_is_refused() -> None:
    for cls in (KeyedSemaphore, KeyedRWLock):
        with pytest.raises(TypeError, match="takes a keylock backend"):
            cls(object(), limit=2) if cls is KeyedSemaphore else cls(object())  # type: ignore[arg-type]


async def test_the_semaphore_surface() -> None:
    backend = MemoryBackend()
    sem = KeyedSemaphore(backend, limit=2, namespace="vendor")
    assert sem.backend is backend
    assert sem.limit == 2
    assert "limit=2" in repr(sem)
    async with sem("acme") as one:
        with sem.sync("acme", timeout=0) as two:
            assert two.token > one.token
            stats = sem.statistics("acme")
            assert (stats.key, stats.held, stats.holders, stats.token) == (
                "vendor:acme",
                True,
                2,
                two.token,
            )
            with pytest.raises(LockTimeout):
                await sem.acquire("acme", timeout=0)
    lease = await sem.acquire("acme")
    await lease.release()
    lease = await asyncio.to_thread(sem.acquire_sync, "acme")
    lease.release_sync()

    @sem.locked(key=lambda n: f"n{n}")
    async def work(n: int) -> int:
        return sem.statistics(f"n{n}").holders

    assert await work(1) == 1

    @sem.locked(key="s")
    def swork() -> int:
        return sem.statistics("s").holders

    assert await asyncio.to_thread(swork) == 1
    assert sem.statistics("acme").held is False
    await sem.close()
    sem.close_sync()


async def test_a_lock_and_a_semaphore_of_one_name_do_not_see_each_other() -> None:
    backend = MemoryBackend()
    locks, sem = KeyedLock(backend), KeyedSemaphore(backend, limit=1)
    async with locks("x"), sem("x"):
        assert locks.statistics("x").held
        assert sem.statistics("x").held


async def test_two_semaphores_that_disagree_about_the_limit() -> None:
    backend = MemoryBackend()
    four, five = KeyedSemaphore(backend, limit=4), KeyedSemaphore(backend, limit=5)
    async with four("api"):
        with pytest.raises(LimitMismatch, match=r"limit 4.*limit 5"):
            await five.acquire("api", timeout=1)
    async with five("api"):  # nobody held it any more: the new limit stands
        pass


async def test_the_rw_surface() -> None:
    backend = MemoryBackend()
    rw = KeyedRWLock(backend, namespace="docs")
    assert rw.backend is backend
    assert "KeyedRWLock" in repr(rw)
    async with rw.read("d") as r1, rw.read("d") as r2:
        assert rw.statistics("d").holders == 2
        assert r2.token > r1.token
        for attempt in (rw.acquire_write, rw.acquire):
            with pytest.raises(LockTimeout):
                await attempt("d", timeout=0)
        with pytest.raises(LockTimeout):
            await asyncio.to_thread(rw.acquire_write_sync, "d", timeout=0.01)
        lease = await rw.acquire_read("d", timeout=0)
        await lease.release()
    async with rw.write("d") as w:
        assert w.token > r2.token
        with pytest.raises(LockTimeout):
            await rw.acquire_read("d", timeout=0)
    async with rw("d"):
        assert rw.statistics("d").holders == 1
    with rw.sync("d"), pytest.raises(LockTimeout):
        rw.acquire_read_sync("d", timeout=0)
    with rw.read_sync("d"), pytest.raises(LockTimeout):
        rw.acquire_sync("d", timeout=0)
    with rw.write_sync("d"):
        pass
    lease = await asyncio.to_thread(rw.acquire_read_sync, "d")
    lease.release_sync()
    await rw.close()
    rw.close_sync()


def test_rw_locked_decorates_in_either_mode() -> None:
    rw = KeyedRWLock()
    seen: list[int] = []
    inside = threading.Barrier(2, timeout=10)

    @rw.locked(key="doc", mode="read")
    def read() -> None:
        inside.wait()  # both readers are in at once
        seen.append(rw.statistics("doc").holders)
        inside.wait()  # neither leaves before both looked

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [2, 2]

    @rw.locked(key="doc")
    def write() -> int:
        with pytest.raises(LockTimeout):
            rw.acquire_read_sync("doc", timeout=0)
        return rw.statistics("doc").holders

    assert write() == 1
    with pytest.raises(ValueError, match="'read' or 'write'"):
        rw.locked(key="doc", mode="both")  # type: ignore[call-overload]
