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
REPLICA_TIMEOUT = 0.5


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


replicated_or_not = pytest.mark.parametrize("replicas", [0, 1], ids=["replicas=0", "replicas=1"])


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


@replicated_or_not
def test_graceful_failover_keeps_leases_and_hands_off(
    cluster: ReplicatedCluster, replicas: int
) -> None:
    """CLUSTER FAILOVER of the shard holding two held keys, each with two waiters (one sync
    thread, one async task, on other clients): the replica had every write, so both leases
    stay valid (renewed on the new primary), their releases hand the keys to the waiters by
    pub/sub, and the waiters' tokens are above the holders'."""
    shard = cluster.shards()[0]
    keys = cluster.lock_keys_on(shard, 2)
    holders = KeyedLock(_backend(cluster, ttl=TTL, replicas=replicas))
    waiters = KeyedLock(_backend(cluster, ttl=TTL, poll=30.0, replicas=replicas))  # (no polls)
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


@replicated_or_not
def test_killed_primary_leases_stay_valid_or_are_reported_lost(
    cluster: ReplicatedCluster, replicas: int
) -> None:
    """SIGKILL of the primary of the shard holding two held keys, with a waiter on each:
    every lease is either renewed on the promoted replica or reported lost (``on_lost``)
    within its TTL of the kill (with ``replicas=1`` it is lost: the promoted primary has no
    replica until the dead node is back, so no extend can be replicated; ``on_lost`` then
    comes when the renewal in flight ends); each waiter gets the key or a clear
    BackendUnavailable within its timeout plus a second; a new acquire after the failover
    works and its token is above every earlier one."""
    shard = cluster.shards()[1]
    keys = cluster.lock_keys_on(shard, 2)
    lost: dict[str, float] = {}
    holders = KeyedLock(
        _backend(cluster, ttl=TTL, replicas=replicas, replica_timeout=REPLICA_TIMEOUT),
        on_lost=lambda lease: lost.setdefault(lease.key, time.time()),
    )
    waiters = KeyedLock(_backend(cluster, ttl=TTL, replicas=replicas))
    leases = {key: _acquire_once_replicated(holders, key) for key in keys}
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
            # lost at its expiry, which no renewal after the kill moved: within TTL of it (its
            # date, not when this thread got to look: kill_primary waits for the promotion,
            # and a loaded machine delays this loop)
            assert lease.expires_at is not None
            assert lease.expires_at - killed < TTL + 0.5, (lease.expires_at, killed)
            deadline = time.monotonic() + 5  # on_lost runs on keylock's callback thread
            while key not in lost and time.monotonic() < deadline:
                time.sleep(0.01)
            # on_lost: when the renewer's attempt in flight at the expiry ends (with replicas,
            # a WAIT of up to replica_timeout), a retry (TTL/10) later at most
            late = TTL + 0.5 + (REPLICA_TIMEOUT + TTL / 10 if replicas else 0)
            assert lost[key] - killed < late, (lease, lost)
            with pytest.raises(LeaseLost):
                lease.release_sync()
    for thread in threads:
        thread.join(15)
    assert len(outcomes) == len(keys)
    cluster.revive()  # (with replicas=1 a shard without a replica grants nothing)
    after = _acquire_once_replicated(holders, keys[0])
    granted = [int(o.split()[1]) for o in outcomes if o.startswith("granted")]
    assert after.token > max([lease.token for lease in leases.values()] + granted)
    after.release_sync()
    holders.close_sync()
    waiters.close_sync()


def _acquire_once_replicated(locks: KeyedLock, key: str, within: float = 30.0) -> Lease:
    """Acquire *key*; with replicas=1 a revived replica that has not yet acknowledged (a
    starved process on a loaded machine) makes the grant BackendUnavailable, given back and
    not held: ask again, within a bound."""
    deadline = time.monotonic() + within
    while True:
        try:
            return locks.acquire_sync(key, timeout=10)
        except BackendUnavailable:
            assert time.monotonic() < deadline, f"no replicated grant of {key!r} in {within}s"


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


def test_replicas_on_cluster_refuse_the_grant_a_lagging_replica_missed(
    cluster: ReplicatedCluster,
) -> None:
    """The failover above with ``replicas=1``: the grant the cut-off replica never saw is
    refused (BackendUnavailable, the key given back), so after the failover nobody believes
    they hold the key, and the next client is granted it with a higher token. WAIT goes to
    the node that ran the script: on a Cluster a keyless WAIT would go to any node. Failed
    before: RedisBackend refused replicas= on a Cluster (ValueError)."""
    shard = cluster.shards()[0]
    key = cluster.lock_keys_on(shard, 1)[0]
    first = KeyedLock(_backend(cluster, ttl=TTL, replicas=1, replica_timeout=0.3))
    before = first.acquire_sync(key, timeout=5)  # replicated: the replica is in sync
    before.release_sync()
    refused: list[BackendUnavailable] = []

    def grant_unreplicated() -> None:
        with pytest.raises(BackendUnavailable) as caught:
            first.acquire_sync(key, timeout=5)
        refused.append(caught.value)

    cluster.kill_primary_while_replica_lags(shard, grant_unreplicated)
    assert "replica" in str(refused[0])
    cluster.revive()
    second = KeyedLock(_backend(cluster, ttl=TTL, replicas=1))
    taken = second.acquire_sync(key, timeout=10)
    assert taken.token > before.token
    taken.release_sync()
    first.close_sync()
    second.close_sync()
