"""A Sentinel failover (the primary killed) with leases held and waiters waiting, on a real
primary + 2 replicas + 3 Sentinels that the test starts on loopback.

The backend follows the new primary (its calls, its listener and its renewer); every lease
held across the failover is still valid or reported lost within its TTL; tokens keep rising;
every waiter gets a lease or a clear keylock error in time. With ``replicas=1`` each lease was
on a replica before it was granted, so the promoted replica still has it: none is lost.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from keylock import BackendUnavailable, KeyedLock, Lease, LeaseLost, LockTimeout
from keylock.backends import RedisBackend

from .._redis_topology import SentinelTopology, poll, running_sentinel_topology

TTL = 6.0  # longer than a failover (down-after 200 ms + an election of up to ~2 s)
TIMEOUT = 8.0
SLACK = 2.0


@pytest.fixture(scope="module")
def topology() -> Iterator[SentinelTopology]:
    with running_sentinel_topology(replicas=2) as topology:
        yield topology


@pytest.fixture
def sentinel(topology: SentinelTopology) -> Iterator[SentinelTopology]:
    """The topology, whole again after the test (the killed node back as a replica)."""
    topology.primary().flushall()
    yield topology
    for port in list(topology.down):
        topology.restore(port)


@pytest.mark.parametrize("replicas", [0, 1])
async def test_a_failover_with_leases_held_and_waiters_waiting(
    sentinel: SentinelTopology, replicas: int
) -> None:
    """Two keys held (one by a sync caller, one async) with a waiter on each, then the
    primary is killed. Each holder's lease is still valid after the failover (it releases
    it) or was reported lost within its TTL; each waiter gets the key or a clear error
    within its timeout; acquires after the failover (sync, async, and a hand-off through the
    listener, which reconnected) get tokens above every one before. With replicas=1 no lease
    is lost: the promoted replica had each of them."""
    lost: dict[str, float] = {}
    holders = KeyedLock(
        RedisBackend.from_url(sentinel.url, ttl=TTL, replicas=replicas),
        on_lost=lambda lease: lost.setdefault(lease.key, time.monotonic()),
    )
    waiters = KeyedLock(RedisBackend.from_url(sentinel.url, ttl=TTL, replicas=replicas))
    sync_lease = await asyncio.to_thread(holders.acquire_sync, "sync", timeout=5)
    async_lease = await holders.acquire("async", timeout=5)
    before = max(sync_lease.token, async_lease.token)
    outcomes: list[tuple[str, float]] = []

    async def wait(key: str) -> None:
        asked = time.monotonic()
        try:
            lease = await waiters.acquire(key, timeout=TIMEOUT)
        except (LockTimeout, BackendUnavailable) as exc:
            outcomes.append((type(exc).__name__, time.monotonic() - asked))
            return
        outcomes.append(("granted", time.monotonic() - asked))
        assert lease.token > before
        await lease.release()

    tasks = [asyncio.create_task(wait(key)) for key in ("sync", "async")]
    queue = holders.backend.layout.lock("sync")[2]  # type: ignore[attr-defined]
    queued = lambda: sentinel.primary().zcard(queue) == 1  # noqa: E731
    await asyncio.to_thread(poll, queued, 5, "the waiter queued")
    killed_at = time.monotonic()
    old = sentinel.kill_primary()
    await asyncio.to_thread(sentinel.wait_for_promotion, old)
    await asyncio.gather(*tasks)
    for outcome, took in outcomes:
        assert took < TIMEOUT + SLACK, (outcome, took)
    for lease in (sync_lease, async_lease):
        try:
            await lease.release()
        except (LeaseLost, BackendUnavailable):
            assert lease.lost, lease
            assert lost[lease.key] - killed_at < TTL + 1.0
        else:
            assert lease.key not in lost
    if replicas:
        assert not lost, lost
    after = [await holders.acquire("after", timeout=5)]
    after.append(await asyncio.to_thread(holders.acquire_sync, "after-sync", timeout=5))
    for lease in after:
        assert lease.token > before
        await lease.release()
    await _hand_off_after(holders, waiters, before)
    await holders.close()
    await waiters.close()


async def _hand_off_after(holders: KeyedLock, waiters: KeyedLock, before: int) -> None:
    """A hand-off on the new primary: the waiter's listener reconnected to it and is woken
    by the release (well before its safety-net poll of 1 s would find the key)."""
    lease = await holders.acquire("handed", timeout=5)
    waiting = waiters.backend._waiting  # type: ignore[attr-defined]
    task = asyncio.create_task(waiters.acquire("handed", timeout=5))
    await asyncio.to_thread(poll, waiting.subscribed, 10, "the listener reconnected")
    queue = holders.backend.layout.lock("handed")[2]  # type: ignore[attr-defined]
    client = redis.asyncio.Redis(port=_primary_port(holders))
    while await client.zcard(queue) < 1:
        await asyncio.sleep(0.005)
    await client.aclose()
    await lease.release()
    released = time.monotonic()
    handed = await task
    assert time.monotonic() - released < 0.5
    assert handed.token > before
    await handed.release()


def _primary_port(locks: KeyedLock) -> int:
    pool = locks.backend._sync().connection_pool  # type: ignore[attr-defined]
    return int(pool.get_master_address()[1])


def test_sync_callers_follow_the_primary_with_a_sentinel_object(
    sentinel: SentinelTopology,
) -> None:
    """RedisBackend(sentinel=redis.sentinel.Sentinel(...), service=...): a lease held across
    the failover is released on the new primary; the renewer kept it (TTL 2 s, failover
    about 1-2 s: it was renewed on the new primary, or reported lost)."""
    manager = redis.sentinel.Sentinel(sentinel.sentinel_addresses, socket_timeout=0.5)
    reported = threading.Event()

    def on_lost(lease: Lease) -> None:
        reported.set()

    locks = KeyedLock(RedisBackend(sentinel=manager, service=sentinel.service), on_lost=on_lost)
    lease = locks.acquire_sync("k", timeout=5)
    old = sentinel.kill_primary()
    sentinel.wait_for_promotion(old)
    try:
        lease.release_sync()
    except (LeaseLost, BackendUnavailable):
        assert reported.wait(TTL)
    again = locks.acquire_sync("k", timeout=5)
    assert again.token > lease.token
    again.release_sync()
    locks.close_sync()
