"""A closed backend refuses every call with one message, whichever layer notices first."""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest

from keylock import BackendUnavailable, KeyedLock
from keylock.backends import Backend, FileBackend
from keylock.backends._tiered import TieredBackend
from keylock.backends.base import described, shape_of

from ..conftest import MakeBackend
from ._driver import Driver, SyncDriver, in_thread, until_waiting


async def _close(backend: Backend, driver: Driver) -> None:
    if isinstance(driver, SyncDriver):
        await in_thread(backend.close_sync)
    else:
        await backend.close()


async def test_a_closed_backend_says_so_to_every_call(
    make_backend: MakeBackend, driver: Driver
) -> None:
    """After close(), acquire, release, extend and statistics raise BackendUnavailable "<the
    backend> is closed: it grants nothing after close() (lock <key>)", on locks and permit
    views alike, a permit view naming its key "semaphore <key>" or "RW lock <key>" (which
    failed before: every view said "lock"). Fails on older code: a Postgres release, extend
    or statistics said "the Postgres backend is closed: it opens no connection after
    close()" or "the pool 'keylock' is already closed"; a Redis one opened a new connection
    after close() and went through; file statistics read through the closed directory. Two
    backends keep what close() does not end: a memory backend has nothing to close (every
    call still works), and a file lease is its lock file's own descriptor (its release and
    extend still work: refusing the release would hold the key until the process exits)."""
    view = make_backend(auto_renew=False)
    locks = KeyedLock(view)
    lease = await driver.acquire(locks, "k", ttl=30)
    backend: Backend = getattr(view, "_parent", view)  # a permit view's close closes nothing
    await _close(backend, driver)
    if not isinstance(backend, TieredBackend):  # memory: no connection, file nor thread
        await driver.extend(lease, 30)
        await driver.release(lease)
        await driver.release(await driver.acquire(locks, "other", timeout=0))
        return

    def closed(key: str) -> pytest.RaisesContext[BackendUnavailable]:
        named = described(key, shape_of(view))
        said = f"{view!r} is closed: it grants nothing after close() ({named})"
        return pytest.raises(BackendUnavailable, match=re.escape(said))

    if isinstance(backend, FileBackend):
        await driver.extend(lease, 30)
        await driver.release(lease)
    else:
        with closed("k"):
            await driver.extend(lease, 30)
        with closed("k"):
            await driver.release(lease)
    with closed("other"):
        await driver.acquire(locks, "other", timeout=0)
    with closed("other"):
        await driver.acquire(locks, "other", timeout=1)
    with closed("other"):
        locks.statistics("other")


async def test_a_caller_waiting_here_when_it_closes_hears_it(
    make_backend: MakeBackend, driver: Driver
) -> None:
    """A caller of this process queued behind a holder when the backend closes gets the
    closed error as soon as the holder's release (refused, or on a file backend done) passes
    the in-process turn on: not a grant, not a wait until its timeout. Fails on the old code
    (18 of 42 cases): on fakeredis it was granted after close(); on Postgres it got the
    pool's "already closed" words; on a file backend a raw "Bad file descriptor" OSError."""
    view = make_backend(auto_renew=False)
    locks = KeyedLock(view)
    lease = await driver.acquire(locks, "k", ttl=30)
    waiting = asyncio.ensure_future(driver.acquire(locks, "k", timeout=30, ttl=30))
    await until_waiting(locks, "k")
    backend: Backend = getattr(view, "_parent", view)
    await _close(backend, driver)
    if not isinstance(backend, TieredBackend):  # memory: nothing to close
        await driver.release(lease)
        await driver.release(await waiting)
        return
    with contextlib.suppress(BackendUnavailable):  # (a file lease is released: see above)
        await driver.release(lease)
    said = f"{view!r} is closed: it grants nothing after close() ({described('k', shape_of(view))})"
    with pytest.raises(BackendUnavailable, match=re.escape(said)):
        await asyncio.wait_for(waiting, 20)
