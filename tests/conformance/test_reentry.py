"""Re-entry: a block that asks again for the key it holds fails at once, on every backend.

Locks are not reentrant. Without detection, a task or thread that asks again for a key its own
enclosing block holds waits for itself: forever (``timeout=None``) or until a LockTimeout that
advises raising the timeout. Each test here fails on a lock that does not detect it (the
inner acquire waits and times out, or hangs until the test's bound).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from keylock import KeyedLock, LockTimeout

from ..conftest import MakeBackend

BOUND = 10.0  # what a missed re-entry would hang for, at most, before the test fails


async def test_an_async_block_asking_again_for_its_key_fails_at_once(
    make_backend: MakeBackend,
) -> None:
    locks = KeyedLock(make_backend(), namespace="re")

    async def nested(timeout: float | None) -> None:
        async with locks("job:1") as outer:
            with pytest.raises(RuntimeError, match="not reentrant") as info:
                async with locks("job:1", timeout=timeout):
                    pass
            assert "re:job:1" in str(info.value)  # names the key as the user knows it
            assert not outer.lost
            assert locks.statistics("job:1").held  # the outer block still holds it
            assert locks.statistics("job:1").waiting == 0  # and nobody was left queued

    for timeout in (None, 5.0):
        await asyncio.wait_for(nested(timeout), BOUND)
    async with locks("job:1"):  # a try never waits: it may probe a key its own block holds
        with pytest.raises(LockTimeout):
            await locks.acquire("job:1", timeout=0)
    again = await locks.acquire("job:1", timeout=0)  # the outer block released it
    await again.release()


async def test_a_sync_block_asking_again_for_its_key_fails_at_once(
    make_backend: MakeBackend,
) -> None:
    locks = KeyedLock(make_backend())

    def nested() -> str:
        with locks.sync("job:2"):
            try:
                with locks.sync("job:2", timeout=BOUND):
                    return "entered twice"
            except (RuntimeError, LockTimeout) as error:
                return str(error)

    message = await asyncio.wait_for(asyncio.to_thread(nested), BOUND)
    assert "not reentrant" in message
    again = await locks.acquire("job:2", timeout=0)
    await again.release()


async def test_nested_calls_of_a_locked_function_fail_at_once(make_backend: MakeBackend) -> None:
    locks = KeyedLock(make_backend())
    calls: list[int] = []

    @locks.locked(key=lambda n: "tree")
    async def walk(n: int) -> None:
        calls.append(n)
        if n:
            await walk(n - 1)  # the same key, from inside its own lock

    with pytest.raises(RuntimeError, match="not reentrant"):
        await asyncio.wait_for(walk(1), BOUND)
    assert calls == [1]

    @locks.locked(key="tree", timeout=BOUND)
    def walk_sync(n: int) -> None:
        if n:
            walk_sync(n - 1)

    with pytest.raises(RuntimeError, match="not reentrant"):
        await asyncio.wait_for(asyncio.to_thread(walk_sync, 1), BOUND)
    assert not locks.statistics("tree").held


async def test_other_tasks_and_threads_still_wait_their_turn(make_backend: MakeBackend) -> None:
    """The check tells a block's own stack from everyone else's: another task of the same loop
    and another thread queue as usual (and get the key when the block ends)."""
    locks = KeyedLock(make_backend())
    got: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with locks("turn"):
            await release.wait()

    async def task() -> None:
        async with locks("turn", timeout=BOUND):
            got.append("task")

    def thread() -> None:
        with locks.sync("turn", timeout=BOUND):
            got.append("thread")

    first = asyncio.create_task(holder())
    while not locks.statistics("turn").held:
        await asyncio.sleep(0.001)
    second = asyncio.create_task(task())
    third = asyncio.create_task(asyncio.to_thread(thread))
    while locks.statistics("turn").waiting < 2:  # both queued, neither refused
        await asyncio.sleep(0.001)
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second, third), BOUND)
    assert sorted(got) == ["task", "thread"]


async def test_an_explicit_lease_may_be_released_by_another_thread(
    make_backend: MakeBackend,
) -> None:
    """A lease from ``acquire()`` belongs to no block: its acquirer may wait for the key again
    while another thread releases it (the documented hand-over), so that is a wait, not an
    error."""
    locks = KeyedLock(make_backend())
    lease = locks.acquire_sync("handed")
    with pytest.raises(LockTimeout):
        locks.acquire_sync("handed", timeout=0)
    releaser = threading.Thread(target=lease.release_sync)
    waiting = asyncio.create_task(asyncio.to_thread(locks.acquire_sync, "handed", timeout=BOUND))
    while locks.statistics("handed").waiting < 1:
        await asyncio.sleep(0.001)
    releaser.start()
    again = await asyncio.wait_for(waiting, BOUND)
    releaser.join()
    assert again.token > lease.token
    await again.release()
