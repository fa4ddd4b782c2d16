"""One KeyedLock, one key, several event loops in several threads (plus plain threads).

An ``asyncio.Lock`` belongs to one loop (``defaultdict(asyncio.Lock)`` shared by two loops
raises or, worse, lets both in); MemoryBackend's queue holds waiters of any loop and any thread.
The overlap detector is shown to catch a lock that does not exclude (the control test), so a
clean run is evidence.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator

from keylock import KeyedLock, LockTimeout

ITERATIONS = 300  # per task
TASKS_PER_LOOP = 4


class Section:
    """Counts holders inside the critical section, across threads; remembers the worst."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self.inside = 0
        self.worst = 0
        self.entries = 0
        self.switches = 0  # entries by another thread than the previous entry's
        self._last = 0

    def enter(self) -> None:
        with self._mutex:
            self.inside += 1
            self.entries += 1
            self.worst = max(self.worst, self.inside)
            me = threading.get_ident()
            self.switches += self._last not in (0, me)
            self._last = me

    def leave(self) -> None:
        with self._mutex:
            self.inside -= 1


class LoopThread:
    """An event loop running in its own thread; ``submit`` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[object, object, object]) -> concurrent.futures.Future[object]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def loop_threads(count: int) -> Iterator[list[LoopThread]]:
    threads = [LoopThread() for _ in range(count)]
    try:
        yield threads
    finally:
        for thread in threads:
            thread.close()


AsyncHold = Callable[[], contextlib.AbstractAsyncContextManager[object]]


async def _contend(hold: AsyncHold, section: Section) -> None:
    """TASKS_PER_LOOP tasks on this loop, each entering the section ITERATIONS times."""

    async def task() -> None:
        for _ in range(ITERATIONS):
            async with hold():
                section.enter()
                await asyncio.sleep(0)  # let the other tasks of this loop try to get in
                section.leave()

    await asyncio.gather(*(task() for _ in range(TASKS_PER_LOOP)))


def _run_on_two_loops(hold: AsyncHold, locks: KeyedLock | None = None) -> Section:
    """Run _contend on two loops at once. With *locks*, the key is held until every task of
    both loops is queued, so the queue mixes the loops and hand-offs cross between them."""
    section = Section()
    with loop_threads(2) as loops:
        gate = None if locks is None else locks.acquire_sync("k")
        futures = [loop.submit(_contend(hold, section)) for loop in loops]
        if locks is not None and gate is not None:
            _until(lambda: locks.statistics("k").waiting == 2 * TASKS_PER_LOOP)
            gate.release_sync()
        for future in futures:
            future.result(60)
    return section


def test_control_the_detector_catches_a_lock_that_does_not_exclude() -> None:
    @contextlib.asynccontextmanager
    async def no_lock() -> AsyncIterator[None]:
        yield

    section = _run_on_two_loops(no_lock)
    assert section.worst > 1


def test_two_loops_in_two_threads_exclude_each_other() -> None:
    locks = KeyedLock()
    section = _run_on_two_loops(lambda: locks("k"), locks)
    assert section.entries == 2 * TASKS_PER_LOOP * ITERATIONS
    assert section.switches > 0  # the loops did hand the key to each other
    assert section.worst == 1
    assert len(locks.backend) == 0  # type: ignore[arg-type]


def test_two_loops_with_timeouts_and_ttls_exclude_each_other() -> None:
    """The slower path (a deadline and a lease TTL) too."""
    locks = KeyedLock()
    section = _run_on_two_loops(lambda: locks("k", timeout=30, ttl=30), locks)
    assert section.switches > 0
    assert section.worst == 1
    assert len(locks.backend) == 0  # type: ignore[arg-type]


def test_sync_threads_and_async_tasks_on_two_loops_exclude_each_other() -> None:
    locks = KeyedLock()
    section = Section()

    def sync_worker() -> None:
        for _ in range(ITERATIONS):
            with locks.sync("k"):
                section.enter()
                section.leave()

    gate = locks.acquire_sync("k")
    workers = [threading.Thread(target=sync_worker) for _ in range(2)]
    for worker in workers:
        worker.start()
    with loop_threads(2) as loops:
        futures = [loop.submit(_contend(lambda: locks("k"), section)) for loop in loops]
        _until(lambda: locks.statistics("k").waiting == 2 * TASKS_PER_LOOP + 2)
        gate.release_sync()  # every thread and task is queued: hand-offs cross between them
        for future in futures:
            future.result(60)
    for worker in workers:
        worker.join(60)
    assert section.entries == (2 * TASKS_PER_LOOP + 2) * ITERATIONS
    assert section.switches > 0
    assert section.worst == 1
    assert len(locks.backend) == 0  # type: ignore[arg-type]


def test_a_cancelled_waiter_on_one_loop_does_not_strand_the_key_for_another() -> None:
    locks = KeyedLock()
    with loop_threads(2) as (one, two):
        holder = locks.acquire_sync("k")
        waiter = one.submit(locks.acquire("k"))
        _until(lambda: locks.statistics("k").waiting == 1)
        waiter.cancel()  # cancels the task on loop one
        _until(lambda: locks.statistics("k").waiting == 0)
        assert waiter.cancelled()
        holder.release_sync()

        async def take() -> int:
            async with locks("k", timeout=10) as lease:
                return lease.token

        assert isinstance(two.submit(take()).result(30), int)
    assert len(locks.backend) == 0  # type: ignore[arg-type]


def test_cancel_racing_the_hand_off_across_loops_passes_the_key_on() -> None:
    """The holder releases (from this thread) while loop one cancels its waiting task: either
    the cancelled waiter never got the key, or it passes it on; loop two's waiter gets it."""
    locks = KeyedLock()
    with loop_threads(2) as (one, two):
        for _ in range(30):
            holder = locks.acquire_sync("k")
            first = one.submit(locks.acquire("k"))
            _until(lambda: locks.statistics("k").waiting == 1)
            second = two.submit(locks.acquire("k", timeout=30))
            _until(lambda: locks.statistics("k").waiting == 2)
            one.loop.call_soon_threadsafe(first.cancel)
            holder.release_sync()
            try:
                lease = first.result(30)
            except concurrent.futures.CancelledError:
                pass
            else:  # the grant won the race: the first waiter holds it and releases normally
                lease.release_sync()  # type: ignore[attr-defined]
            second.result(30).release_sync()  # type: ignore[attr-defined]
            assert len(locks.backend) == 0  # type: ignore[arg-type]


def test_a_timed_out_waiter_on_one_loop_leaves_no_trace() -> None:
    locks = KeyedLock()
    with loop_threads(2) as (one, two):
        holder = locks.acquire_sync("k")
        timed_out = one.submit(locks.acquire("k", timeout=0.01))
        try:
            timed_out.result(30)
        except LockTimeout:
            pass
        else:
            raise AssertionError("granted while held")
        assert locks.statistics("k").waiting == 0
        later = two.submit(locks.acquire("k", timeout=30))
        _until(lambda: locks.statistics("k").waiting == 1)
        holder.release_sync()
        later.result(30).release_sync()  # type: ignore[attr-defined]
    assert len(locks.backend) == 0  # type: ignore[arg-type]


def _until(predicate: Callable[[], bool]) -> None:
    event = threading.Event()
    for _ in range(10_000):
        if predicate():
            return
        event.wait(0.001)
    raise AssertionError("condition never held")
