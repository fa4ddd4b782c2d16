"""Lease: release once, expiry and ``lost``, extend, errors leaving a block, the decorator.

TTLs here are short (0.05 s) and the tests sleep well past them; no test asserts an upper bound
on time.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time

import pytest

from keylock import KeyedLock, Lease, LeaseLost

TTL = 0.05
PAST_TTL = 0.12


async def _extend(lease: Lease, ttl: float | None, *, sync: bool) -> None:
    if sync:
        lease.extend_sync(ttl)
    else:
        await lease.extend(ttl)


def _assert_free(locks: KeyedLock, key: str) -> None:
    assert not locks.statistics(key).held
    assert len(locks.backend) == 0  # type: ignore[arg-type]


async def test_a_lease_describes_its_hold() -> None:
    locks = KeyedLock()
    lease = await locks.acquire("job:7", ttl=5)
    assert isinstance(lease, Lease)
    assert lease.key == "job:7"
    assert isinstance(lease.token, int)
    assert len(lease.owner) == 16
    assert lease.owner == lease.owner  # stable once read
    assert lease.expires_at is not None
    assert lease.expires_at > time.time()
    assert not lease.lost
    assert not lease.released
    assert "held" in repr(lease)
    await lease.release()
    assert lease.released
    assert "released" in repr(lease)
    async with locks("job:7") as plain:
        assert plain.expires_at is None


async def test_double_release_is_a_runtime_error() -> None:
    locks = KeyedLock()
    lease = await locks.acquire("k")
    await lease.release()
    with pytest.raises(RuntimeError, match="already released"):
        await lease.release()
    with pytest.raises(RuntimeError, match="already released"):
        lease.release_sync()
    with pytest.raises(RuntimeError, match="released"):
        await lease.extend(5)
    async with locks("k") as held:
        pass
    with pytest.raises(RuntimeError, match="already released"):
        await held.release()
    with locks.sync("k") as held_sync:
        pass
    with pytest.raises(RuntimeError, match="already released"):
        held_sync.release_sync()
    _assert_free(locks, "k")


async def test_a_double_release_does_not_release_the_next_holder() -> None:
    locks = KeyedLock()
    first = await locks.acquire("k")
    await first.release()
    second = await locks.acquire("k")
    with pytest.raises(RuntimeError):
        await first.release()
    assert locks.statistics("k").token == second.token
    await second.release()
    _assert_free(locks, "k")


async def test_release_of_a_block_never_entered_is_a_runtime_error() -> None:
    locks = KeyedLock()
    with pytest.raises(RuntimeError, match="never acquired"):
        await locks("k").release()
    block = locks("k")
    async with block:
        pass
    with pytest.raises(RuntimeError, match="already entered"):
        async with block:
            pass


async def test_lost_after_ttl_expiry_and_release_raises_and_frees_the_key() -> None:
    locks = KeyedLock()
    lease = await locks.acquire("k", ttl=TTL)
    assert not lease.lost
    await asyncio.sleep(PAST_TTL)
    assert lease.lost
    assert locks.statistics("k").held  # nobody took it over: still recorded...
    with pytest.raises(LeaseLost) as info:
        await lease.release()
    assert info.value.key == "k"
    assert lease.lost
    assert lease.released
    _assert_free(locks, "k")  # ...and freed by the release


def test_sync_release_of_an_expired_lease() -> None:
    locks = KeyedLock()
    lease = locks.acquire_sync("k", ttl=TTL)
    time.sleep(PAST_TTL)
    assert lease.lost
    with pytest.raises(LeaseLost):
        lease.release_sync()
    _assert_free(locks, "k")


async def test_expired_lease_taken_over_then_old_release_leaves_the_new_holder_alone() -> None:
    locks = KeyedLock()
    old = await locks.acquire("k", ttl=TTL)
    await asyncio.sleep(PAST_TTL)
    new = await locks.acquire("k", timeout=0)
    assert new.token > old.token
    with pytest.raises(LeaseLost):
        await old.release()
    assert locks.statistics("k").token == new.token
    with pytest.raises(Exception, match="not granted"):
        await locks.acquire("k", timeout=0)
    await new.release()
    _assert_free(locks, "k")


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_extend_on_a_live_lease_moves_expires_at(sync: bool) -> None:
    locks = KeyedLock()
    lease = await locks.acquire("k", ttl=TTL)
    before = lease.expires_at
    assert before is not None
    await _extend(lease, 60, sync=sync)
    assert lease.expires_at is not None
    assert lease.expires_at > before + 30
    assert lease.ttl == 60
    await asyncio.sleep(PAST_TTL)  # past the original TTL: still live
    assert not lease.lost
    with pytest.raises(Exception, match="not granted"):
        await locks.acquire("k", timeout=0)
    await _extend(lease, None, sync=sync)  # default: its own (new) TTL
    await lease.release()
    _assert_free(locks, "k")


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_extend_on_a_lost_lease_raises(sync: bool) -> None:
    locks = KeyedLock()
    lease = await locks.acquire("k", ttl=TTL)
    await asyncio.sleep(PAST_TTL)
    with pytest.raises(LeaseLost):
        await _extend(lease, 60, sync=sync)
    assert lease.lost
    with pytest.raises(LeaseLost):
        await lease.release()
    _assert_free(locks, "k")


async def test_on_lost_callback_fires_once() -> None:
    seen: list[Lease] = []
    locks = KeyedLock(on_lost=seen.append)
    lease = await locks.acquire("k", ttl=TTL)
    await asyncio.sleep(PAST_TTL)
    with pytest.raises(LeaseLost):
        await lease.extend()
    with pytest.raises(LeaseLost):
        await lease.release()
    assert seen == [lease]


async def test_body_error_with_a_lost_lease_keeps_the_body_error_with_a_note() -> None:
    locks = KeyedLock()

    async def body_fails_after_expiry() -> None:
        async with locks("k", ttl=TTL):
            await asyncio.sleep(PAST_TTL)
            raise KeyError("body")

    def sync_body_fails_after_expiry() -> None:
        with locks.sync("k", ttl=TTL):
            time.sleep(PAST_TTL)
            raise KeyError("sync body")

    with pytest.raises(KeyError, match="body") as info:
        await body_fails_after_expiry()
    notes = getattr(info.value, "__notes__", [])
    assert any("'k'" in note and "lost" in note for note in notes)
    _assert_free(locks, "k")

    with pytest.raises(KeyError, match="sync body") as sync_info:
        sync_body_fails_after_expiry()
    assert any("lost" in note for note in getattr(sync_info.value, "__notes__", []))
    _assert_free(locks, "k")


async def test_a_clean_body_with_a_lost_lease_raises_lease_lost() -> None:
    locks = KeyedLock()
    with pytest.raises(LeaseLost):
        async with locks("k", ttl=TTL):
            await asyncio.sleep(PAST_TTL)
    with pytest.raises(LeaseLost), locks.sync("k", ttl=TTL):
        time.sleep(PAST_TTL)
    _assert_free(locks, "k")


# ---------------------------------------------------------------------------- decorator


class _Section:
    """Counts callers inside a critical section at once (thread-safe)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self.inside: dict[str, int] = {}
        self.worst = 0

    def enter(self, key: str) -> None:
        with self._mutex:
            self.inside[key] = self.inside.get(key, 0) + 1
            self.worst = max(self.worst, self.inside[key])

    def leave(self, key: str) -> None:
        with self._mutex:
            self.inside[key] -= 1


async def test_locked_async_function_with_a_key_function() -> None:
    locks = KeyedLock()
    section = _Section()

    @locks.locked(key=lambda agent_id, *_, **__: f"agent:{agent_id}")
    async def handle(agent_id: int, event: str, *, retry: bool = False) -> str:
        """Handle one event for one agent."""
        section.enter(f"agent:{agent_id}")
        assert locks.statistics(f"agent:{agent_id}").held
        for _ in range(3):
            await asyncio.sleep(0)
        section.leave(f"agent:{agent_id}")
        return f"{agent_id}:{event}:{retry}"

    results = await asyncio.gather(*(handle(i % 2, str(i), retry=i == 3) for i in range(10)))
    assert results == [f"{i % 2}:{i}:{i == 3}" for i in range(10)]
    assert section.worst == 1
    assert inspect.iscoroutinefunction(handle)
    assert handle.__name__ == "handle"
    assert handle.__qualname__.endswith("handle")
    assert handle.__doc__ == "Handle one event for one agent."
    assert handle.__module__ == __name__
    assert inspect.signature(handle) == inspect.signature(handle.__wrapped__)  # type: ignore[attr-defined]
    assert len(locks.backend) == 0  # type: ignore[arg-type]


async def test_locked_async_function_with_a_fixed_key_excludes_concurrent_calls() -> None:
    locks = KeyedLock()
    section = _Section()

    @locks.locked(key="batch:1", timeout=5)
    async def promote(n: int) -> int:
        section.enter("batch:1")
        await asyncio.sleep(0)
        section.leave("batch:1")
        return n

    assert await asyncio.gather(*(promote(i) for i in range(8))) == list(range(8))
    assert section.worst == 1


def test_locked_sync_function_in_threads() -> None:
    locks = KeyedLock()
    section = _Section()

    @locks.locked(key=lambda job: f"job:{job}")
    def claim(job: int) -> int:
        """Claim one job."""
        section.enter(f"job:{job}")
        time.sleep(0.001)
        section.leave(f"job:{job}")
        return job

    @locks.locked(key="fixed")
    def fixed(x: int) -> int:
        section.enter("fixed")
        time.sleep(0.001)
        section.leave("fixed")
        return x * 2

    barrier = threading.Barrier(8)
    results: list[int] = []

    def run(i: int) -> None:
        barrier.wait()
        results.append(claim(i % 2))
        results.append(fixed(i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == sorted([i % 2 for i in range(8)] + [2 * i for i in range(8)])
    assert section.worst == 1
    assert not inspect.iscoroutinefunction(claim)
    assert claim.__name__ == "claim"
    assert claim.__doc__ == "Claim one job."
    assert claim.__wrapped__.__name__ == "claim"  # type: ignore[attr-defined]
    assert len(locks.backend) == 0  # type: ignore[arg-type]


async def test_locked_passes_timeout_and_ttl() -> None:
    locks = KeyedLock()

    @locks.locked(key="k", timeout=0, ttl=5)
    async def work() -> float | None:
        return locks.statistics("k").token

    @locks.locked(key="k", timeout=0)
    def sync_work() -> None:
        return None

    assert await work() is not None
    async with locks("k"):
        with pytest.raises(TimeoutError):
            await work()
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(sync_work)
    assert len(locks.backend) == 0  # type: ignore[arg-type]
