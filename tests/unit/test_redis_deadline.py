"""A Redis acquire's timeout is one budget: the time a caller waits for its turn in this
process (the in-process line in front of Redis) counts against it, for locks and permits."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from keylock import KeyedLock, LockTimeout
from keylock.backends import RedisBackend
from keylock.backends.base import RW_LIMIT

from .._redis_server import Server

TIMEOUT = 1.0
LATE = 0.4  # how late past its deadline a timeout may come on a loaded host


def _views(backend: RedisBackend, case: str) -> tuple[KeyedLock, KeyedLock]:
    """The first waiter's and the second's: two lock callers, or an RW reader then a
    writer (one in-process permit table for both)."""
    if case == "lock":
        return KeyedLock(backend), KeyedLock(backend)
    return KeyedLock(backend.permits(RW_LIMIT, 1)), KeyedLock(backend.permits(RW_LIMIT, RW_LIMIT))


def _holder(backend: RedisBackend, case: str) -> KeyedLock:
    return KeyedLock(backend if case == "lock" else backend.permits(RW_LIMIT, RW_LIMIT))


@pytest.mark.parametrize("case", ["lock", "rw"])
async def test_a_turn_waited_for_in_process_counts_against_the_timeout(
    redis_server: Server, case: str
) -> None:
    """The key held elsewhere; two callers of one backend wait with timeout=1 s, the second
    queued in this process behind the first. The first times out at 1 s and passes its
    turn on; the second must time out at its own 1 s too. Fails before: the second got a
    fresh 1 s at Redis once its in-process turn came, and timed out about 2 s after it
    asked (seen in the permit failover chaos row: an RW writer granted 2-4 s past its
    timeout)."""
    other, backend = (
        RedisBackend.from_url(redis_server.url),
        RedisBackend.from_url(redis_server.url),
    )
    held = await _holder(other, case).acquire("k", timeout=1)
    first, second = _views(backend, case)
    ended: dict[str, float] = {}

    async def wait(locks: KeyedLock, name: str) -> None:
        asked = time.monotonic()
        with pytest.raises(LockTimeout):
            await locks.acquire("k", timeout=TIMEOUT)
        ended[name] = time.monotonic() - asked

    task = asyncio.create_task(wait(first, "first"))
    await asyncio.sleep(0.05)
    await wait(second, "second")
    await task
    assert ended["second"] < TIMEOUT + LATE, ended
    await held.release()
    await backend.close()
    await other.close()


@pytest.mark.parametrize("case", ["lock", "rw"])
def test_a_turn_waited_for_in_process_counts_against_the_timeout_sync(
    redis_server: Server, case: str
) -> None:
    """The same with threads (acquire_sync). Fails before, as above."""
    other, backend = (
        RedisBackend.from_url(redis_server.url),
        RedisBackend.from_url(redis_server.url),
    )
    held = _holder(other, case).acquire_sync("k", timeout=1)
    first, second = _views(backend, case)

    def wait(locks: KeyedLock) -> float:
        asked = time.monotonic()
        with pytest.raises(LockTimeout):
            locks.acquire_sync("k", timeout=TIMEOUT)
        return time.monotonic() - asked

    thread = threading.Thread(target=wait, args=(first,))
    thread.start()
    time.sleep(0.05)
    took = wait(second)
    thread.join()
    assert took < TIMEOUT + LATE, took
    held.release_sync()
    backend.close_sync()
    other.close_sync()
