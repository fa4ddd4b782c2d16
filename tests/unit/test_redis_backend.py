"""RedisBackend specifics: owner checks in the scripts, Cluster-safe keys, auto-renew and
loss signalling, connection errors, tokens from the server clock."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from keylock import BackendUnavailable, KeyedLock, LeaseLost, LockTimeout
from keylock.backends import RedisBackend
from keylock.backends.redis import _tag

from .._redis_server import Server


@pytest.fixture
def url(redis_server: Server) -> str:
    redis_server.flush()
    return redis_server.url


def _slot_tags(keys: list[str]) -> set[str]:
    tags = set()
    for key in keys:
        start = key.index("{")
        tags.add(key[start + 1 : key.index("}", start + 1)])
    return tags


@pytest.mark.parametrize("key", ["agent:42", "a}b", "{x}", "}", "{", "é/ü"])
def test_every_key_of_a_lock_shares_one_hash_tag(key: str) -> None:
    backend = RedisBackend(redis.Redis(), ttl=5)
    keys = backend._keys(key)
    assert len(_slot_tags(keys)) == 1
    assert _slot_tags(keys) != {""}
    assert "{" not in _tag(key) or key == _tag(key)


async def test_a_forged_owner_cannot_release_or_extend_on_the_server(url: str) -> None:
    locks = KeyedLock(RedisBackend.from_url(url), namespace="own")
    lease = await locks.acquire("mine")
    backend = RedisBackend.from_url(url)
    forged = b"\x02" * 16
    assert (
        backend._run_sync(
            "release",
            "own:mine",
            backend._release_keys("own:mine"),
            [forged, backend._channel, "own:mine"],
        )
        == 0
    )
    assert (
        backend._run_sync("extend", "own:mine", backend._keys("own:mine")[:2], [forged, 1000, 2000])
        == 0
    )
    with pytest.raises(LockTimeout):
        await KeyedLock(backend, namespace="own").acquire("mine", timeout=0)
    await lease.release()
    await locks.close()
    await backend.close()


async def test_tokens_follow_the_server_clock(url: str) -> None:
    locks = KeyedLock(RedisBackend.from_url(url))
    lease = await locks.acquire("clock")
    server_us = int(redis.Redis.from_url(url).time()[0]) * 1_000_000
    assert abs(lease.token - server_us) < 60 * 1_000_000  # µs since the epoch, roughly now
    await lease.release()
    await locks.close()


async def test_auto_renew_keeps_a_lease_past_its_ttl(url: str) -> None:
    locks = KeyedLock(RedisBackend.from_url(url, ttl=0.6))
    other = KeyedLock(RedisBackend.from_url(url, ttl=0.6))
    async with locks("renewed") as lease:
        await asyncio.sleep(1.5)  # 2.5 TTLs
        assert not lease.lost
        with pytest.raises(LockTimeout):
            await other.acquire("renewed", timeout=0)
    await locks.close()
    await other.close()


async def test_without_auto_renew_the_lease_lapses(url: str) -> None:
    locks = KeyedLock(RedisBackend.from_url(url, ttl=0.3, auto_renew=False))
    lease = await locks.acquire("lapse")
    await asyncio.sleep(0.5)
    assert lease.lost
    with pytest.raises(LeaseLost):
        await lease.release()
    await locks.close()


async def test_a_lost_lease_signals_and_cancels_the_section(url: str) -> None:
    """Renewal finds the lease gone (here: deleted behind our back): lost turns true, on_lost
    runs, and with cancel_on_lost the section is cancelled and LeaseLost leaves the block."""
    seen = []
    locks = KeyedLock(RedisBackend.from_url(url, ttl=0.6), on_lost=seen.append, cancel_on_lost=True)
    raw = redis.Redis.from_url(url)
    finished = False
    leases = []

    async def section() -> None:
        nonlocal finished
        async with locks("doomed") as lease:
            leases.append(lease)
            raw.delete(locks.backend._keys("doomed")[0])  # type: ignore[attr-defined]
            await asyncio.sleep(5)  # cancelled at the next renewal (ttl/3)
            finished = True

    with pytest.raises(LeaseLost):
        await section()
    (lease,) = leases
    assert not finished
    assert lease.lost
    assert seen == [lease]
    await locks.close()


def test_sync_waiter_wakes_on_release_not_on_poll(url: str) -> None:
    """Release publishes a wake-up: the waiter gets the key long before its 10 s poll."""
    holder = KeyedLock(RedisBackend.from_url(url))
    waiter = KeyedLock(RedisBackend.from_url(url, poll=10.0))
    lease = holder.acquire_sync("ping")
    import threading

    got: list[float] = []

    def wait() -> None:
        start = time.monotonic()
        waiter.acquire_sync("ping", timeout=30).release_sync()
        got.append(time.monotonic() - start)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)
    lease.release_sync()
    thread.join(30)
    assert got
    assert got[0] < 5  # woken by the release message, not by the 10 s safety net
    holder.close_sync()
    waiter.close_sync()


def test_unreachable_server_is_backend_unavailable(redis_server: Server) -> None:
    from .._redis_server import free_port

    locks = KeyedLock(RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1") as info:
        locks.acquire_sync("k", timeout=0)
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert locks.statistics  # nothing held locally either:
    assert len(locks.backend._local) == 0  # type: ignore[attr-defined]
    locks.close_sync()


def test_bad_url_is_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="bad Redis URL"):
        RedisBackend.from_url("nonsense://where")
