"""``lease.took_over``: true exactly when the grant followed a lease that ended without its
holder's release while live (it expired: the holder died, froze or lost it), false after a
release and for a key never locked. Every backend, both flavours.

Before lease.took_over was recorded beyond MemoryBackend, the expiry cases failed on file,
redis, redis-cluster and postgres (took_over was False); the release cases passed everywhere.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from keylock import KeyedLock, Lease, LeaseLost
from keylock.backends import FileBackend, RedisBackend
from keylock.backends.redis import force_release

from .._redis_server import Server
from ..conftest import MakeBackend
from ._driver import Driver, until_waiting

TTL = 0.2  # injected short lease: the tests poll for its expiry, bounded


async def until(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Bounded poll of *condition* (instead of a sleep that "should be long enough")."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within}s")
        await asyncio.sleep(0.005)


async def test_a_first_grant_and_one_after_a_release_did_not_take_over(
    make_backend: MakeBackend, driver: Driver
) -> None:
    first_locks = KeyedLock(make_backend(auto_renew=False))
    other_locks = KeyedLock(make_backend(auto_renew=False))
    first = await driver.acquire(first_locks, "clean", ttl=TTL * 50)
    assert first.took_over is False  # never locked before
    waiter = asyncio.ensure_future(driver.acquire(other_locks, "clean", timeout=10))
    await until_waiting(other_locks, "clean")
    await driver.release(first)
    handed = await waiter
    assert handed.took_over is False  # handed over by a release
    await driver.release(handed)
    after = await driver.acquire(first_locks, "clean", timeout=10)
    assert after.took_over is False  # the key was free, released cleanly
    await driver.release(after)


@pytest.mark.parametrize("ttl", [None, TTL * 50], ids=["untimed", "timed"])
async def test_a_caller_after_an_expired_lease_took_it_over(
    make_backend: MakeBackend, driver: Driver, ttl: float | None
) -> None:
    """The holder never releases (it died, or froze past its TTL): the next caller, timed or
    not, took the key over; extend keeps the flag; the one after a clean release did not."""
    dead_locks = KeyedLock(make_backend(auto_renew=False))
    locks = KeyedLock(make_backend(auto_renew=False))
    dead = await driver.acquire(dead_locks, "lapsed", ttl=TTL)
    await until(lambda: dead.lost, "the lease's expiry")
    lease = await driver.acquire(locks, "lapsed", timeout=10, ttl=ttl)
    assert lease.took_over is True
    assert lease.token > dead.token
    await driver.extend(lease, 5.0)
    assert lease.took_over is True
    await driver.release(lease)
    after = await driver.acquire(locks, "lapsed", timeout=10, ttl=ttl)
    assert after.took_over is False
    await driver.release(after)


async def test_a_release_that_comes_after_the_expiry_still_leaves_a_takeover(
    make_backend: MakeBackend, driver: Driver
) -> None:
    """The holder froze past its TTL, then released (LeaseLost) with nobody waiting: its work
    was unprotected, so the next holder took the key over. MemoryBackend forgot the lapse at
    that late release (the next holder was told False) while the other backends kept it."""
    late_locks = KeyedLock(make_backend(auto_renew=False))
    locks = KeyedLock(make_backend(auto_renew=False))
    late = await driver.acquire(late_locks, "late", ttl=TTL)
    await until(lambda: late.lost, "the lease's expiry")
    # a holder judges its lease lost a little early (by up to a round trip): the release
    # must come after the server's expiry too, a whole TTL later leaves no doubt
    expired_at = late.expires_at
    assert expired_at is not None
    await until(lambda: time.time() > expired_at + TTL, "the server's expiry")
    with pytest.raises(LeaseLost):
        await driver.release(late)
    lease = await driver.acquire(locks, "late", timeout=10)
    assert lease.took_over is True
    await driver.release(lease)
    after = await driver.acquire(locks, "late", timeout=10)
    assert after.took_over is False
    await driver.release(after)


async def test_a_waiter_that_gets_the_key_at_expiry_took_it_over(
    make_backend: MakeBackend, driver: Driver
) -> None:
    """The waiter queued while the holder was live; the holder froze past its TTL: the
    waiter took the key over, and the holder's late release is LeaseLost."""
    frozen_locks = KeyedLock(make_backend(auto_renew=False))
    waiting_locks = KeyedLock(make_backend(auto_renew=False))
    frozen = await driver.acquire(frozen_locks, "frozen", ttl=TTL)
    waiter = asyncio.ensure_future(driver.acquire(waiting_locks, "frozen", timeout=10))
    # queued, or already through: on a loaded host the waiter's first step can come after the
    # 0.2 s TTL, and then it is never seen waiting (a CI run waited 10 s for that)
    await until(
        lambda: waiter.done() or waiting_locks.statistics("frozen").waiting > 0,
        "the waiter queueing",
    )
    lease = await waiter
    assert lease.took_over is True
    with pytest.raises(LeaseLost):
        await driver.release(frozen)
    await driver.release(lease)
    after = await driver.acquire(frozen_locks, "frozen", timeout=10)
    assert after.took_over is False
    await driver.release(after)


# ---------------------------------------------------------------- backend-specific endings

_ctx = multiprocessing.get_context("fork")


def _hold_until_killed(directory: str, ready: object) -> None:
    KeyedLock(FileBackend(directory)).acquire_sync("saga")
    ready.set()  # type: ignore[attr-defined]
    time.sleep(600)  # until SIGKILL


def _acquire_in_child(directory: str, results: object) -> None:
    locks = KeyedLock(FileBackend(directory))
    lease = locks.acquire_sync("saga", timeout=30)
    results.put(lease.took_over)  # type: ignore[attr-defined]
    lease.release_sync()


def test_file_a_holder_process_killed_is_taken_over(tmp_path: Path) -> None:
    """A holder process SIGKILLed with the key (no TTL: the OS frees its lock): the next
    holder, in this process, took it over; after its clean release, another process did
    not. Fails before the released mark (took_over was False)."""
    directory = str(tmp_path / "locks")
    ready = _ctx.Event()
    holder = _ctx.Process(target=_hold_until_killed, args=(directory, ready))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
    holder.join(30)
    locks = KeyedLock(FileBackend(directory))
    lease = locks.acquire_sync("saga", timeout=30)
    assert lease.took_over is True
    lease.release_sync()
    results = _ctx.Queue()
    child = _ctx.Process(target=_acquire_in_child, args=(directory, results))
    child.start()
    assert results.get(timeout=30) is False
    child.join(30)
    assert child.exitcode == 0


@pytest.mark.parametrize("waiting", [False, True], ids=["later", "waiting"])
def test_redis_a_forced_release_is_a_takeover(redis_server: Server, waiting: bool) -> None:
    """``keylock release --force`` ends a lease its holder did not release: the next holder,
    whether it comes later or was waiting (handed the key at once), took it over; the one
    after a clean release did not. Fails before the unreleased mark (took_over was False)."""
    redis_server.flush()
    raw = redis.Redis.from_url(redis_server.url)
    holder = KeyedLock(RedisBackend.from_url(redis_server.url))
    other = KeyedLock(RedisBackend.from_url(redis_server.url))
    stuck = holder.acquire_sync("stuck")
    got: list[Lease] = []
    thread = threading.Thread(target=lambda: got.append(other.acquire_sync("stuck", timeout=10)))
    if waiting:
        thread.start()
        queue = other.backend.layout.lock("stuck")[2]  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while not raw.zcard(queue):  # bounded: until the waiter queued on Redis
            assert time.monotonic() < deadline
            thread.join(0.005)
    assert force_release(raw, "stuck", owner=stuck.owner)
    if not waiting:
        thread.start()
    thread.join(10)
    assert got[0].took_over is True
    with pytest.raises(LeaseLost):
        stuck.release_sync()
    got[0].release_sync()
    after = holder.acquire_sync("stuck", timeout=10)
    assert after.took_over is False
    after.release_sync()
    holder.close_sync()
    other.close_sync()
    raw.close()
