"""The wrong form of a block (``with`` on an async hold, ``async with`` on a sync one, a sync
wait on an event loop's thread) names the right call for the object that made the hold: an
RW lock's read or write twin, a semaphore's, or a lock's."""

from __future__ import annotations

import pytest

from keylock import KeyedLock, KeyedRWLock, KeyedSemaphore

rw = KeyedRWLock()
sem = KeyedSemaphore(limit=2)
locks = KeyedLock()

CASES = [
    (rw.read, rw.read_sync, "rw.read", "rw.read_sync"),
    (rw.write, rw.write_sync, "rw.write", "rw.write_sync"),
    (rw, rw.sync, "rw.write", "rw.write_sync"),  # rw(key) is the write lock
    (sem, sem.sync, "sem", "sem.sync"),
    (locks, locks.sync, "locks", "locks.sync"),
]


@pytest.mark.parametrize(("make", "make_sync", "used", "twin"), CASES)
async def test_with_on_an_async_hold_names_its_sync_twin(
    make: object, make_sync: object, used: str, twin: str
) -> None:
    """Fails on the old code for every RW and semaphore form: for rw.read it advised
    locks.sync(k), which on an RW lock takes the write lock."""
    with pytest.raises(TypeError, match="is for 'async with'") as info, make("k"):  # type: ignore[operator]
        pass
    assert f"{used}('k') is for" in str(info.value)
    assert f"use 'with {twin}('k')'" in str(info.value)


@pytest.mark.parametrize(("make", "make_sync", "used", "twin"), CASES)
async def test_async_with_on_a_sync_hold_names_its_async_twin(
    make: object, make_sync: object, used: str, twin: str
) -> None:
    """Fails on the old code for every RW and semaphore form (it named locks(...))."""
    with pytest.raises(TypeError, match="is for 'with'") as info:
        async with make_sync("k"):  # type: ignore[operator]
            pass
    assert f"{twin}('k') is for" in str(info.value)
    assert f"'async with {used}('k')'" in str(info.value)


async def test_a_sync_wait_on_a_loop_thread_names_the_read_twin() -> None:
    """Fails on the old code: it advised 'async with locks(k)' (a write lock) to a reader."""
    shared = KeyedRWLock()
    async with shared.write("k"):
        with pytest.raises(RuntimeError, match="would block") as info, shared.read_sync("k"):
            pass
    assert "rw.read_sync('k') would block" in str(info.value)
    assert "'async with rw.read('k')'" in str(info.value)


@pytest.mark.parametrize(
    "make", [locks, locks.sync, sem, sem.sync, rw, rw.sync, rw.read, rw.read_sync, rw.write]
)
def test_the_key_by_keyword_is_refused_naming_it(make: object) -> None:
    """``locks(key="k")``: the key is positional-only on every block form (the guard keeps
    timeout/ttl keyword-only at no cost to the hot call); the TypeError names ``key`` and
    says it is positional. No old code to fail on: this pins the contract."""
    with pytest.raises(TypeError, match=r"positional-only arguments passed as keyword.*'key'"):
        make(key="k")  # type: ignore[operator]


@pytest.mark.parametrize("make", [locks, locks.sync, sem, sem.sync])
def test_a_positional_timeout_is_refused_naming_the_fix(make: object) -> None:
    """The guard itself: ``locks("k", 5)`` says timeout= and ttl= go by keyword, with an
    example. (An RW lock's forms have no guard: Python's own "takes 2 positional arguments
    but 3 were given".) No old code to fail on: this pins the contract."""
    with pytest.raises(TypeError, match=r"by keyword only, e\.g\. .*\('k', timeout=5\)"):
        make("k", 5)  # type: ignore[operator]
