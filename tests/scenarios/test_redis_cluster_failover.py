"""A Redis Cluster with replicas loses the primary of one shard while leases are held and
waiters wait: by ``CLUSTER FAILOVER`` (graceful) and by killing the primary. The backend
follows the new primary (the slot map, the renewer, the listener), every lease held across
the failover is either still valid or reported lost within its TTL, and tokens keep rising.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from keylock import BackendUnavailable, KeyedLock, Lease, LeaseLost, StaleToken
from keylock.backends import RedisBackend
from keylock.fencing import fenced_set_sync

from .._redis_cluster_topology import ReplicatedCluster, running_replicated_cluster
from .._redis_server import Server

TTL = 3.0


@pytest.fixture(scope="module")
def replicated() -> Iterator[ReplicatedCluster]:
    with running_replicated_cluster() as cluster:
        yield cluster


@pytest.fixture
def cluster(replicated: ReplicatedCluster) -> ReplicatedCluster:
    replicated.revive()  # a test that killed a node leaves it down
    replicated.flush()
    return replicated


def _backend(cluster: ReplicatedCluster, **options: float) -> RedisBackend:
    return RedisBackend.from_url(cluster.url, cluster=True, **options)  # type: ignore[arg-type]


def _renewed_after(lease: Lease, wall: float, within: float) -> bool:
    """Whether *lease* is renewed by a renewal sent after *wall* (time.time()) within
    *within* seconds: its expiry then lies past ``wall + ttl``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        expires_at = lease.expires_at
        if lease.lost or expires_at is None:
            return False
        if expires_at > wall + (lease.ttl or 0):
            return True
        time.sleep(0.01)
    return False


def test_auto_renewed_lease_on_cluster_outlives_its_ttl(cluster: ReplicatedCluster) -> None:
    """A lease on a Cluster held for twice its TTL stays ours: the renewer's batch goes
    through the Cluster pipeline. Failed before: redis-py's Cluster pipeline refuses its
    ``evalsha`` method, so every renewal on a Cluster failed and every auto-renewed lease was
    reported lost at its TTL."""
    locks = KeyedLock(_backend(cluster, ttl=1.0))
    lease = locks.acquire_sync("renewed", timeout=5)
    start = time.time()
    assert _renewed_after(lease, start + 1.0, within=3.0), lease
    assert not lease.lost
    lease.release_sync()
    locks.close_sync()


def test_graceful_failover_keeps_leases_and_hands_off(cluster: ReplicatedCluster) -> None:
    """CLUSTER FAILOVER of the shard holding two held keys, each with two waiters (one sync
    thread, one async task, on other clients): the replica had every write, so both leases
    stay valid (renewed on the new primary), their releases hand the keys to the waiters by
    pub/sub, and the waiters' tokens are above the holders'."""
    shard = cluster.shards()[0]
    keys = cluster.lock_keys_on(shard, 2)
    holders = KeyedLock(_backend(cluster, ttl=TTL))
    waiters = KeyedLock(_backend(cluster, ttl=TTL, poll=30.0))  # hand-offs, not polls
    leases = {key: holders.acquire_sync(key, timeout=5) for key in keys}
    got: dict[str, list[int]] = {key: [] for key in keys}

    def wait_sync(key: str) -> None:
        lease = waiters.acquire_sync(key, timeout=15)
        got[key].append(lease.token)
        lease.release_sync()

    async def wait_async(key: str) -> None:
        lease = await waiters.acquire(key, timeout=15)
        got[key].append(lease.token)
        await lease.release()

    async def scenario() -> None:
        tasks = [asyncio.create_task(wait_async(key)) for key in keys]
        tasks += [asyncio.create_task(asyncio.to_thread(wait_sync, key)) for key in keys]
        probe = redis.cluster.RedisCluster.from_url(cluster.url)
        for key in keys:  # each backend sends one waiter per key to Redis
            while probe.zcard(waiters.backend.layout.lock(key)[2]) < 1:  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)
        probe.close()
        failed_over = time.time()
        await asyncio.to_thread(cluster.failover, shard)
        for lease in leases.values():
            assert await asyncio.to_thread(_renewed_after, lease, failed_over, TTL), lease
        released = time.monotonic()
        for lease in leases.values():
            await lease.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert time.monotonic() - released < 5  # woken by the hand-off, not the 30 s poll

    asyncio.run(scenario())
    for key, lease in leases.items():
        assert not lease.lost
        assert len(got[key]) == 2, got
        assert min(got[key]) > lease.token, got
    holders.close_sync()
    waiters.close_sync()


def test_killed_primary_leases_stay_valid_or_are_reported_lost(
    cluster: ReplicatedCluster,
) -> None:
    """SIGKILL of the primary of the shard holding two held keys, with a waiter on each:
    every lease is either renewed on the promoted replica or reported lost (``on_lost``)
    within its TTL of the kill; each waiter gets the key or a clear BackendUnavailable
    within its timeout plus a second; a new acquire after the failover works and its token
    is above every earlier one."""
    shard = cluster.shards()[1]
    keys = cluster.lock_keys_on(shard, 2)
    lost: dict[str, float] = {}
    holders = KeyedLock(
        _backend(cluster, ttl=TTL), on_lost=lambda lease: lost.setdefault(lease.key, time.time())
    )
    waiters = KeyedLock(_backend(cluster, ttl=TTL))
    leases = {key: holders.acquire_sync(key, timeout=5) for key in keys}
    outcomes: list[str] = []

    def wait(key: str) -> None:
        asked = time.monotonic()
        try:
            lease = waiters.acquire_sync(key, timeout=8)
            outcomes.append(f"granted {lease.token}")
            lease.release_sync()
        except BackendUnavailable:
            outcomes.append("unavailable")
        assert time.monotonic() - asked < 8 + 1

    threads = [threading.Thread(target=wait, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    killed = time.time()
    cluster.kill_primary(shard)
    for key, lease in leases.items():
        if _renewed_after(lease, killed, TTL):
            assert not lease.lost
            lease.release_sync()
        else:
            assert lease.lost
            assert lost[key] - killed < TTL + 0.5, (lease, lost)
            with pytest.raises(LeaseLost):
                lease.release_sync()
    for thread in threads:
        thread.join(15)
    assert len(outcomes) == len(keys)
    after = holders.acquire_sync(keys[0], timeout=10)
    granted = [int(o.split()[1]) for o in outcomes if o.startswith("granted")]
    assert after.token > max([lease.token for lease in leases.values()] + granted)
    after.release_sync()
    holders.close_sync()
    waiters.close_sync()


def test_listener_reconnects_after_its_node_is_killed(cluster: ReplicatedCluster) -> None:
    """The listener's pub/sub node (the primary of its channel's slot) is killed: it
    subscribes again within seconds, on another node, and hand-offs reach waiters by pub/sub
    again. Failed before: it went back to the dead node's address from a slot map nothing
    refreshed, forever, so every waiter after the failover paid up to a second to start and
    polled every 10 ms."""
    waiting = _backend(cluster, ttl=TTL, poll=30.0)
    waiters = KeyedLock(waiting)
    holders = KeyedLock(_backend(cluster, ttl=TTL))

    def hand_off(key: str) -> float:
        lease = holders.acquire_sync(key, timeout=5)
        releaser = threading.Timer(0.3, lease.release_sync)
        releaser.start()
        asked = time.monotonic()
        waiters.acquire_sync(key, timeout=10).release_sync()
        releaser.join()
        return time.monotonic() - asked

    hand_off("first")  # starts the listener
    listener = waiting._waiting.listener
    assert listener is not None
    assert listener._pubsub is not None
    node = listener._pubsub.get_pubsub_node()  # type: ignore[attr-defined]
    shard = next(s for s in cluster.shards() if node.port in (s.primary.port, s.replica.port))
    assert shard.primary.port == node.port  # the channel's slot's primary
    cluster.kill_primary(shard)
    deadline = time.monotonic() + 10
    while not waiting._waiting.subscribed():
        assert time.monotonic() < deadline, "the listener never subscribed again"
        time.sleep(0.01)
    other = next(s for s in cluster.shards() if s.primary.port != shard.replica.port)
    assert hand_off(cluster.lock_keys_on(other, 1)[0]) < 0.9  # (no second-long start)
    holders.close_sync()
    waiters.close_sync()


def test_failover_to_a_lagging_replica_can_grant_twice_and_the_fence_holds(
    cluster: ReplicatedCluster, redis_server: Server
) -> None:
    """What replication without ``replicas=`` risks, shown: the replica is paused while a
    lease is granted, the primary is killed, the replica is elected without the grant, and
    a second client is granted the same key while the first still holds it. Tokens still
    rise (the server clock, not the lost counter, mints them), so the fenced store rejects
    the first holder's write after the second's; and the first holder learns within its TTL
    that its lease is gone."""
    redis_server.flush()
    store = redis.Redis.from_url(redis_server.url)
    shard = cluster.shards()[2]
    key = cluster.lock_keys_on(shard, 1)[0]
    lost = threading.Event()
    first = KeyedLock(_backend(cluster, ttl=TTL), on_lost=lambda lease: lost.set())
    second = KeyedLock(_backend(cluster, ttl=TTL))
    held: list[Lease] = []

    def grant_unreplicated() -> None:
        held.append(first.acquire_sync(key, timeout=5))
        fenced_set_sync(store, key, held[0].token, "first")

    killed = time.monotonic()
    cluster.kill_primary_while_replica_lags(shard, grant_unreplicated)
    lease = held[0]
    taken = second.acquire_sync(key, timeout=10)
    assert not lease.lost or lost.is_set()  # granted twice: the first may not know yet
    assert taken.token > lease.token
    fenced_set_sync(store, key, taken.token, "second")
    with pytest.raises(StaleToken):
        fenced_set_sync(store, key, lease.token, "first, stale")
    assert lost.wait(max(TTL - (time.monotonic() - killed), 0) + 0.5)
    taken.release_sync()
    with pytest.raises(LeaseLost):
        lease.release_sync()
    first.close_sync()
    second.close_sync()
    store.close()
