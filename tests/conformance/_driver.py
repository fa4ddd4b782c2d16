"""One surface over both API flavours: async methods, or their ``_sync`` twins run in threads.

Every conformance test awaits the driver, so the same test body checks both flavours, and any
drift between a method and its twin fails a test.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from keylock import KeyedLock, Lease

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], /, *args: object, **kwargs: object) -> T:
    """Run *fn* in a thread of its own (the default pool has too few threads for contention)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)  # type: ignore[arg-type]

    def run() -> None:
        try:
            outcome = fn(*args, **kwargs)
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, outcome, None)

    threading.Thread(target=run, daemon=True).start()
    return await future


class Driver:
    """The async flavour: calls the async API directly."""

    name = "async"

    async def acquire(
        self, locks: KeyedLock, key: str, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        return await locks.acquire(key, timeout=timeout, ttl=ttl)

    async def release(self, lease: Lease) -> None:
        await lease.release()

    async def extend(self, lease: Lease, ttl: float | None = None) -> None:
        await lease.extend(ttl)


class SyncDriver(Driver):
    """The sync flavour: each call runs the ``_sync`` twin in a worker thread."""

    name = "sync"

    async def acquire(
        self, locks: KeyedLock, key: str, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        return await in_thread(locks.acquire_sync, key, timeout=timeout, ttl=ttl)

    async def release(self, lease: Lease) -> None:
        await in_thread(lease.release_sync)

    async def extend(self, lease: Lease, ttl: float | None = None) -> None:
        await in_thread(lease.extend_sync, ttl)


async def until_waiting(locks: KeyedLock, key: str, count: int = 1, within: float = 10.0) -> None:
    """Bounded poll until *locks* sees at least *count* callers waiting for *key* (instead of a
    sleep that "should be long enough" for them to queue)."""
    deadline = time.monotonic() + within
    while locks.statistics(key).waiting < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} waiter(s) for {key!r} never queued within {within}s")
        await asyncio.sleep(0.001)


def flavours() -> list[object]:
    return [pytest.param(Driver(), id="async"), pytest.param(SyncDriver(), id="sync")]
