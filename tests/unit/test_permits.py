"""The memory permit table at the backend level: capacity, FIFO across weights, one token
counter per key, the limit record, TTL expiry and took_over, and nothing left behind."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from keylock import LeaseLost, LimitMismatch, LockTimeout
from keylock.backends import Backend, MemoryBackend
from keylock.backends._permits import MemoryPermits
from keylock.backends.base import RW_LIMIT, Grant, KeyStatistics, Permits, Waiter

NO_OWNER = b""  # in-process: the token proves ownership


def _try(view: Backend, key: str = "k", ttl: float | None = None) -> Grant | None:
    return view._try_acquire(key, NO_OWNER, ttl, None)


def test_views_are_cached_per_shape_and_validated() -> None:
    backend = MemoryBackend()
    assert backend.permits(3) is backend.permits(3, 1)
    assert backend.permits(3) is not backend.permits(4)
    assert isinstance(backend.permits(3), MemoryPermits)
    assert backend.permits(3).shape == Permits(3, 1)
    for limit in (0, -1, True, 2.0, "3", None):
        with pytest.raises(ValueError, match="limit must be a positive int"):
            backend.permits(limit)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight 4 exceeds limit 3"):
        backend.permits(3, 4)
    with pytest.raises(TypeError, match="already a permit view"):
        backend.permits(3).permits(2)


def test_a_backend_without_permits_says_so() -> None:
    class Bare(MemoryBackend):
        permits = Backend.permits  # type: ignore[assignment]

    with pytest.raises(TypeError, match="Bare has no semaphores"):
        Bare().permits(2)


@pytest.mark.parametrize("limit", [1, 3])
def test_at_most_limit_permits_and_tokens_rise(limit: int) -> None:
    view = MemoryBackend().permits(limit)
    grants = [_try(view) for _ in range(limit)]
    assert all(g is not None for g in grants)
    assert _try(view) is None  # full
    tokens = [g[0] for g in grants if g is not None]
    assert tokens == sorted(set(tokens))
    stats = view.statistics("k")
    assert (stats.held, stats.token, stats.holders, stats.waiting) == (True, tokens[-1], limit, 0)
    view.release_sync("k", NO_OWNER, tokens[0])
    again = _try(view)
    assert again is not None
    assert again[0] > tokens[-1]
    for token in [*tokens[1:], again[0]]:
        view.release_sync("k", NO_OWNER, token)
    assert len(view) == 0
    assert view.statistics("k") == KeyStatistics("k", False, None, None, 0)


def test_the_permit_keyspace_is_separate_from_the_lock_keyspace() -> None:
    backend = MemoryBackend()
    lock = backend._try_acquire("k", NO_OWNER, None, None)
    permit = _try(backend.permits(1))
    assert lock is not None
    assert permit is not None
    backend.release_sync("k", NO_OWNER, lock[0])
    backend.permits(1).release_sync("k", NO_OWNER, permit[0])


def test_a_limit_mismatch_is_refused_while_the_key_is_in_use() -> None:
    backend = MemoryBackend()
    three, two = backend.permits(3), backend.permits(2)
    held = _try(three)
    assert held is not None
    with pytest.raises(LimitMismatch) as raised:
        _try(two)
    assert raised.value.key == "k"
    assert isinstance(raised.value, ValueError)
    assert "limit 3" in str(raised.value)
    assert "limit 2" in str(raised.value)
    with pytest.raises(LimitMismatch, match="an RW lock"):
        _try(backend.permits(RW_LIMIT, 1))
    three.release_sync("k", NO_OWNER, held[0])
    # the record went away with the last holder: another limit is now fine
    other = _try(two)
    assert other is not None
    two.release_sync("k", NO_OWNER, other[0])
    assert len(two) == 0


async def test_a_limit_mismatch_is_refused_while_the_key_is_only_awaited() -> None:
    backend = MemoryBackend()
    one = backend.permits(1)
    held = _try(one)
    assert held is not None
    waiting = asyncio.create_task(one.acquire("k", NO_OWNER, timeout=None, ttl=None))
    while one.statistics("k").waiting < 1:
        await asyncio.sleep(0.001)
    one.release_sync("k", NO_OWNER, held[0])
    second = await waiting
    with pytest.raises(LimitMismatch):
        await backend.permits(5).acquire("k", NO_OWNER, timeout=1.0, ttl=None)
    one.release_sync("k", NO_OWNER, second[0])
    assert len(one) == 0


async def test_rw_readers_share_a_writer_excludes_and_fifo_across_weights() -> None:
    """A waiting writer blocks readers that arrive after it; then it gets the key with a token
    above every earlier one, and the readers behind it are granted together after it."""
    backend = MemoryBackend()
    read, write = backend.permits(RW_LIMIT, 1), backend.permits(RW_LIMIT, RW_LIMIT)
    r1, r2 = _try(read), _try(read)
    assert r1 is not None
    assert r2 is not None
    assert _try(write) is None
    writer = asyncio.create_task(write.acquire("k", NO_OWNER, timeout=None, ttl=None))
    while read.statistics("k").waiting < 1:
        await asyncio.sleep(0.001)
    assert _try(read) is None  # a try never passes a waiter
    late = [
        asyncio.create_task(read.acquire("k", NO_OWNER, timeout=None, ttl=None)) for _ in range(3)
    ]
    while read.statistics("k").waiting < 4:
        await asyncio.sleep(0.001)
    read.release_sync("k", NO_OWNER, r1[0])
    await asyncio.sleep(0)
    assert not writer.done()  # r2 still reads
    read.release_sync("k", NO_OWNER, r2[0])
    w = await writer
    assert w[0] > r2[0]
    assert not any(t.done() for t in late)
    write.release_sync("k", NO_OWNER, w[0])
    grants = await asyncio.gather(*late)
    assert all(g[0] > w[0] for g in grants)
    assert read.statistics("k").holders == 3
    for g in grants:
        read.release_sync("k", NO_OWNER, g[0])
    assert len(read) == 0


async def test_a_writer_that_gives_up_lets_the_readers_behind_it_in() -> None:
    backend = MemoryBackend()
    read, write = backend.permits(RW_LIMIT, 1), backend.permits(RW_LIMIT, RW_LIMIT)
    r1 = _try(read)
    assert r1 is not None
    writer = asyncio.create_task(write.acquire("k", NO_OWNER, timeout=None, ttl=None))
    while read.statistics("k").waiting < 1:
        await asyncio.sleep(0.001)
    reader = asyncio.create_task(read.acquire("k", NO_OWNER, timeout=None, ttl=None))
    while read.statistics("k").waiting < 2:
        await asyncio.sleep(0.001)
    writer.cancel()
    r2 = await reader  # granted beside r1 as soon as the writer left the line
    assert read.statistics("k").holders == 2
    with pytest.raises(asyncio.CancelledError):
        await writer
    read.release_sync("k", NO_OWNER, r1[0])
    read.release_sync("k", NO_OWNER, r2[0])
    assert len(read) == 0


@pytest.mark.parametrize("limit", [1, 3])
async def test_timeout_and_cancel_leave_nothing(limit: int) -> None:
    view = MemoryBackend().permits(limit)
    held = [_try(view) for _ in range(limit)]
    with pytest.raises(LockTimeout):
        await view.acquire("k", NO_OWNER, timeout=0.01, ttl=None)
    with pytest.raises(LockTimeout):
        await asyncio.to_thread(view.acquire_sync, "k", NO_OWNER, timeout=0.01, ttl=None)
    waiting = asyncio.create_task(view.acquire("k", NO_OWNER, timeout=None, ttl=None))
    while view.statistics("k").waiting < 1:
        await asyncio.sleep(0.001)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert view.statistics("k").waiting == 0
    for grant in held:
        assert grant is not None
        view.release_sync("k", NO_OWNER, grant[0])
    assert len(view) == 0


async def test_a_grant_that_raced_a_cancel_is_passed_on() -> None:
    view = MemoryBackend().permits(1)
    held = _try(view)
    assert held is not None
    first = asyncio.create_task(view.acquire("k", NO_OWNER, timeout=None, ttl=None))
    second = asyncio.create_task(view.acquire("k", NO_OWNER, timeout=None, ttl=None))
    while view.statistics("k").waiting < 2:
        await asyncio.sleep(0.001)
    view.release_sync("k", NO_OWNER, held[0])  # hands the permit to `first`...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    grant = await second
    view.release_sync("k", NO_OWNER, grant[0])
    assert len(view) == 0


def test_ttl_expiry_frees_the_room_and_the_next_grant_took_over() -> None:
    view = MemoryBackend().permits(2)
    stuck = _try(view, ttl=0.05)
    alive = _try(view)
    assert stuck is not None
    assert alive is not None
    assert _try(view) is None
    deadline = time.monotonic() + 10
    while (after := _try(view)) is None:  # bounded poll until the TTL ran out
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert after[3] is True
    assert alive[3] is False
    with pytest.raises(LeaseLost):
        view.release_sync("k", NO_OWNER, stuck[0])
    with pytest.raises(LeaseLost):
        view.extend_sync("k", NO_OWNER, stuck[0], 1.0)
    view.release_sync("k", NO_OWNER, alive[0])
    view.release_sync("k", NO_OWNER, after[0])
    assert len(view) == 0


def test_an_expired_permit_with_nobody_after_it_still_tells_the_next_holder() -> None:
    view = MemoryBackend().permits(3)
    stuck = _try(view, ttl=0.01)
    assert stuck is not None
    time.sleep(0.02)  # (the TTL must run out; nothing waits on this)
    with pytest.raises(LeaseLost):
        view.release_sync("k", NO_OWNER, stuck[0])
    assert len(view) == 0  # a lapsed record is not a holder
    nxt = _try(view)
    assert nxt is not None
    assert nxt[3] is True
    view.release_sync("k", NO_OWNER, nxt[0])
    later = _try(view)
    assert later is not None
    assert later[3] is False
    view.release_sync("k", NO_OWNER, later[0])


def test_extend_moves_the_deadline() -> None:
    view = MemoryBackend().permits(3)
    grant = _try(view, ttl=0.5)
    assert grant is not None
    extended = view.extend_sync("k", NO_OWNER, grant[0], 30.0)
    assert extended.token == grant[0]
    assert extended.deadline is not None
    assert extended.deadline > time.monotonic() + 20
    view.release_sync("k", NO_OWNER, grant[0])
    with pytest.raises(LeaseLost):
        view.extend_sync("k", NO_OWNER, grant[0], 1.0)
    with pytest.raises(LeaseLost):
        view.release_sync("k", NO_OWNER, grant[0])


async def test_a_waiter_wakes_when_a_holder_lapses() -> None:
    view = MemoryBackend().permits(1)
    stuck = _try(view, ttl=0.1)
    assert stuck is not None
    started = time.monotonic()
    grant = await view.acquire("k", NO_OWNER, timeout=30, ttl=None)
    assert time.monotonic() - started < 29
    assert grant[3] is True
    view.release_sync("k", NO_OWNER, grant[0])


def test_threads_never_exceed_the_limit() -> None:
    view = MemoryBackend().permits(3)
    inside = 0
    most = 0
    mutex = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(50):
            grant = view.acquire_sync("k", NO_OWNER, timeout=10, ttl=None)
            with mutex:
                inside += 1
                most = max(most, inside)
            time.sleep(0)
            with mutex:
                inside -= 1
            view.release_sync("k", NO_OWNER, grant[0])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most == 3
    assert len(view) == 0


async def test_a_block_waiting_for_a_key_it_holds_a_permit_of_is_refused() -> None:
    from keylock import KeyedLock

    backend = MemoryBackend()
    rw_read = KeyedLock(backend.permits(RW_LIMIT, 1))
    write = KeyedLock(backend.permits(RW_LIMIT, RW_LIMIT))
    async with rw_read("doc"):
        with pytest.raises(RuntimeError, match="not reentrant"):
            async with write("doc"):
                pass
        with pytest.raises(LockTimeout):  # a try may probe it
            await write.acquire("doc", timeout=0)
    assert len(rw_read.backend) == 0  # type: ignore[arg-type]


def test_a_waiter_whose_loop_closed_is_skipped() -> None:
    view = MemoryBackend().permits(1)
    held = _try(view)
    assert held is not None

    class Gone(Waiter):
        def wake(self) -> bool:
            return False

    gone = Gone(NO_OWNER, None)
    assert view._try_acquire("k", NO_OWNER, None, gone) is None
    view.release_sync("k", NO_OWNER, held[0])
    assert gone.grant is None
    assert len(view) == 0


def test_a_forked_child_starts_with_no_permit_held() -> None:
    import os

    view = MemoryBackend().permits(1)
    held = _try(view)
    assert held is not None
    pid = os.fork()
    if pid == 0:  # the child: the parent's holder does not exist here
        child = _try(view)
        os._exit(0 if child is not None and len(view) == 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _try(view) is None  # the parent's permit is still held here
    view.release_sync("k", NO_OWNER, held[0])
