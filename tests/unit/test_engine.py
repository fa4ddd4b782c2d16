"""The engine's contracts that the hostile review and the engine issue named (rows of
shared/repro/README.md). Each test failed on the code before the engine: see its docstring."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time

import pytest

from keylock import KeyedLock, LeaseLost, Observer
from keylock.backends import FileBackend, Grant, MemoryBackend


class ManualClock:
    """A clock the test steps by hand (the Clock protocol of keylock._clock)."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, "30", True])
def test_backend_ttls_are_held_to_the_per_call_rules(tmp_path: object, ttl: object) -> None:
    """Row 3 (adv_05): MemoryBackend(ttl=0) and FileBackend(ttl=-1) were accepted, and 8 of 8
    tasks were inside at once."""
    with pytest.raises((TypeError, ValueError), match="ttl"):
        MemoryBackend(ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="ttl"):
        FileBackend(str(tmp_path), ttl=ttl)  # type: ignore[arg-type]


def test_lost_is_judged_on_the_monotonic_clock_and_stays_lost() -> None:
    """Row 9 (adv_41): ``lost`` read the wall clock, so a step back of 30 s showed a lease
    taken over as live; and a late renewal could turn a lost lease live again."""
    clock = ManualClock()
    locks = KeyedLock(MemoryBackend(clock=clock))
    lease = locks.acquire_sync("k", ttl=10)
    clock.wall -= 30  # the wall clock steps back: changes nothing
    clock.mono += 10.5
    assert lease.lost
    other = locks.acquire_sync("k", timeout=0)  # taken over
    assert other.token > lease.token
    lease._on_renewed(Grant(lease.token, clock.wall + 60, clock.mono + 60))  # a late renewal
    assert lease.lost  # final
    with pytest.raises(LeaseLost):
        lease.release_sync()
    other.release_sync()


async def test_a_loss_reported_after_the_block_never_cancels_the_task() -> None:
    """Row 7 (adv_38): cancel_on_lost decided on the renewer's thread from stale state, so a
    cancel could land after the block exited and kill unrelated work."""
    locks = KeyedLock(cancel_on_lost=True)
    async with locks("k", ttl=30) as lease:
        pass
    await asyncio.to_thread(lease._on_lost)  # a backend thread reports the loss too late
    await asyncio.sleep(0.01)  # the unrelated work that follows the block
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_loss_during_the_block_cancels_it_with_lease_lost() -> None:
    """cancel_on_lost still works: a loss reported while the block runs ends it with
    LeaseLost, and on_lost runs on the holder's loop."""
    seen: list[int] = []
    locks = KeyedLock(cancel_on_lost=True, on_lost=lambda _: seen.append(threading.get_ident()))

    async def section() -> None:
        async with locks("k", ttl=30) as lease:
            await asyncio.to_thread(lease._on_lost)
            await asyncio.sleep(5)

    with pytest.raises(LeaseLost):
        await section()
    assert seen == [threading.get_ident()]


def test_an_observer_that_raises_never_leaks_a_grant() -> None:
    """Row 18 (adv_28): Observer.acquired raising left a granted lease nobody could release."""

    class Broken(Observer):
        def acquired(self, prefix: str, waited: float, *, contended: bool | None) -> None:
            raise RuntimeError("metrics down")

        def released(self, prefix: str, held: float) -> None:
            raise RuntimeError("metrics down")

    locks = KeyedLock(observer=Broken())
    with locks.sync("k") as lease:
        assert not lease.lost
    assert not locks.statistics("k").held
    again = locks.acquire_sync("k", timeout=0)
    again.release_sync()


async def test_the_wrong_with_fails_at_once_naming_the_right_one() -> None:
    """Engine item 4: locks(key) and locks.sync(key) were one object, so ``with locks(key)``
    inside a coroutine silently blocked the loop."""
    locks = KeyedLock()
    with pytest.raises(TypeError, match=r"async with locks\('k'\)"):
        async with locks.sync("k"):
            pass
    with pytest.raises(TypeError, match=r"with locks.sync\('k'\)"), locks("k"):
        pass
    assert not locks.statistics("k").held


def test_a_hand_off_to_a_waiter_whose_loop_closed_passes_the_key_on() -> None:
    """Row 19 (adv_34): the key went to a task whose loop was closed, and stayed held."""
    locks = KeyedLock()
    holder = locks.acquire_sync("job")
    abandoned: list[object] = []

    def abandon_a_waiter() -> None:
        loop = asyncio.new_event_loop()

        async def main() -> None:
            abandoned.append(asyncio.ensure_future(locks.acquire("job")))
            for _ in range(100):  # until it is queued (bounded)
                if locks.statistics("job").waiting:
                    break
                await asyncio.sleep(0.001)

        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=abandon_a_waiter)
    thread.start()
    thread.join()
    holder.release_sync()
    locks.acquire_sync("job", timeout=2).release_sync()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_child_forked_while_another_thread_uses_the_lock_can_lock() -> None:
    """Row 13 (adv_08): a child forked while another thread held the backend's mutex hung on
    acquire_sync(timeout=0) (5-7 of 20 forks)."""
    locks = KeyedLock()
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            with locks.sync("busy"):
                pass

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(10):
            pid = os.fork()
            if pid == 0:  # the child: one try must answer at once
                try:
                    locks.acquire_sync("busy", timeout=0).release_sync()
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            deadline = time.monotonic() + 10
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("the forked child hung on the lock")
                time.sleep(0.005)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        thread.join()


async def test_a_sync_wait_on_a_running_loop_is_refused_at_once() -> None:
    """Issue 16 finding 3: ``locks.sync(key)`` on a running loop whose task holds the key hung
    until killed (timeout=None) or raised LockTimeout advising a longer timeout."""
    locks = KeyedLock()
    async with locks("k"):  # this very task holds it
        with pytest.raises(RuntimeError, match="would block this thread's running event loop"):
            locks.acquire_sync("k")
    held, release = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with locks("k"):
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()  # another task of this loop holds it: waiting would stop the loop
    with pytest.raises(RuntimeError, match="would block this thread's running event loop"):
        locks.acquire_sync("k")
    with pytest.raises(RuntimeError, match=r"async with locks\('k'\)"):
        locks.acquire_sync("k", timeout=2)
    release.set()
    await task
    # a try, or an uncontended key, never blocks: both still work on the loop
    locks.acquire_sync("k", timeout=0).release_sync()
    with locks.sync("other"):
        pass
    assert not locks.statistics("k").held


async def test_observers_that_raise_never_change_a_guard_or_a_flight_outcome() -> None:
    """An Observer.superseded or Observer.coalesced that raised made a dropped stale_guard
    call raise instead of returning SUPERSEDED, and a single-flight follower raise."""
    from keylock import SUPERSEDED, SingleFlight, stale_guard

    class Broken(Observer):
        def superseded(self, prefix: str) -> None:
            raise RuntimeError("metrics down")

        def coalesced(self, prefix: str) -> None:
            raise RuntimeError("metrics down")

    locks = KeyedLock(observer=Broken())
    state = {"v": 1}

    @stale_guard(locks, key=lambda k: k, snapshot=lambda k: state["v"])
    async def handle(k: str) -> str:
        return "ran"

    async with locks("a"):
        call = asyncio.create_task(handle("a"))
        await asyncio.sleep(0)
        state["v"] = 2  # changes while the call waits for the lock: it must be dropped
    assert await call is SUPERSEDED

    flight = SingleFlight(observer=Broken())
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 7

    calls = [asyncio.create_task(flight.do("k", work)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*calls) == [7, 7, 7]


async def test_observer_groups_stay_bounded_whatever_the_keys() -> None:
    """Row 30 (adv_37): a key without ':' was its own prefix: 50,000 ids made 50,000 groups in
    keylock.COUNTERS (18 MB, never freed) and as many OpenTelemetry label values."""
    from keylock import Counters
    from keylock.observe import MAX_PREFIXES, NO_PREFIX, OTHER_PREFIXES

    counters = Counters()
    locks = KeyedLock(observer=counters)
    for i in range(2_000):
        async with locks(f"order-{i}"):
            pass
    assert list(counters.snapshot()) == [NO_PREFIX]
    assert counters.snapshot()[NO_PREFIX].acquired == 2_000

    class PerKey(Counters):  # a prefix_of that returns the whole key: still bounded
        prefix_of = staticmethod(lambda key: key)

    capped = PerKey()
    many = KeyedLock(observer=capped)
    for i in range(MAX_PREFIXES + 50):
        async with many(f"k{i}"):
            pass
    groups = capped.snapshot()
    assert len(groups) == MAX_PREFIXES + 1
    assert groups[OTHER_PREFIXES].acquired == 50


def test_huge_finite_timeouts_and_ttls_wait_instead_of_overflowing(tmp_path: object) -> None:
    """Row 36 (adv_07): timeout=1e10 or ttl=1e10 (above threading.TIMEOUT_MAX) made a
    contended sync acquire raise a raw OverflowError."""
    for backend in (MemoryBackend(), FileBackend(str(tmp_path))):
        locks = KeyedLock(backend)
        holder = locks.acquire_sync("k", ttl=1e10)
        outcome: list[object] = []

        def wait(locks: KeyedLock = locks, outcome: list[object] = outcome) -> None:
            try:
                lease = locks.acquire_sync("k", timeout=1e10)
            except BaseException as exc:  # reported, not swallowed: the assertion names it
                outcome.append(exc)
            else:
                outcome.append(lease.token)
                lease.release_sync()

        thread = threading.Thread(target=wait)
        thread.start()
        deadline = time.monotonic() + 10
        while not locks.statistics("k").waiting:  # bounded poll: the waiter queued
            assert time.monotonic() < deadline
            time.sleep(0.001)
        holder.release_sync()
        thread.join(10)
        assert outcome, "the waiter never returned"
        assert isinstance(outcome[0], int), outcome


async def test_a_waiter_never_returns_a_grant_that_lapsed_before_it_woke() -> None:
    """Row 1 on memory, found by the blocked-loop chaos generator: the key was handed to a
    waiter whose loop then stayed frozen past the TTL, and acquire returned the lapsed grant
    (``lease.lost`` true at once). Failed before ``Backend._live``: the grant came back."""
    clock = ManualClock()
    locks = KeyedLock(MemoryBackend(clock=clock))
    holder = await locks.acquire("k", ttl=1)
    waiter = asyncio.create_task(locks.acquire("k", ttl=1))
    await asyncio.sleep(0)  # queued
    await holder.release()  # handed to the waiter, dated now...
    clock.mono += 2  # ...and its loop is frozen past the TTL before the task resumes
    lease = await waiter
    assert not lease.lost  # a fresh grant, not the lapsed one
    assert lease.token > holder.token + 1  # the lapsed grant's token was never shown
    await lease.release()
    assert len(locks.backend) == 0  # type: ignore[arg-type]


def test_redis_backend_ttl_is_held_to_the_per_call_rules() -> None:
    """Found by the backend-parameter chaos generator: RedisBackend(ttl=1e-4) was accepted,
    while a per-call ttl below 0.001 is a ValueError."""
    from keylock.backends import RedisBackend

    with pytest.raises(ValueError, match="ttl"):
        RedisBackend.from_url("redis://localhost:1", ttl=1e-4)  # no connection is made
