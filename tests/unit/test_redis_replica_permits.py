"""``replicas=N`` for semaphores and RW locks: a permit's grant, its hand-off and its extends
count only once N replicas acknowledged them (WAIT on the script's connection), as for locks;
on a real primary + replica the test starts, reached directly or through Sentinels."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from keylock import BackendUnavailable, KeyedLock, KeyedRWLock, KeyedSemaphore, Lease
from keylock.backends import RedisBackend
from keylock.backends.base import RW_LIMIT
from keylock.backends.redis._permit_scripts import PERMIT_ACQUIRE
from keylock.errors import LimitMismatch

from .._redis_topology import SentinelTopology, poll, running_sentinel_topology
from .test_redis_replicas import _stall, _url


@pytest.fixture(params=["primary", "sentinel"])
def topology(request: pytest.FixtureRequest) -> Iterator[SentinelTopology]:
    """A primary and one replica of its own, reached at the primary's address or through
    three Sentinels (``url``)."""
    sentinels = 3 if request.param == "sentinel" else 0
    with running_sentinel_topology(sentinels=sentinels) as topology:
        yield topology


def _permits(backend: RedisBackend, shape: str) -> KeyedLock:
    """A KeyedLock over *backend*'s permits of *shape*: a semaphore of 3, or an RW writer."""
    if shape == "sem3":
        return KeyedLock(backend.permits(3, 1))
    return KeyedLock(backend.permits(RW_LIMIT, RW_LIMIT))


def _holders(topology: SentinelTopology, backend: RedisBackend, key: str) -> set[bytes]:
    """The owners the replica has as live holders of *key*'s permits (in the holders zset, or
    the lone holder of an uncontended grant, kept in the record: see _permit_fast)."""
    record, holders = backend.layout.permit(key, b"")[:2]
    replica = topology.replica()
    lone = replica.hget(record, "solo")
    return set(replica.zrange(holders, 0, -1)) | ({lone} if lone else set())


@pytest.mark.parametrize("shape", ["sem3", "rw-writer"])
def test_a_permit_grant_returns_only_once_the_replica_has_it(
    topology: SentinelTopology, shape: str
) -> None:
    """With the replica stalled for 0.4 s, a replicas=1 permit acquire returns only after it
    woke and has the permit; replicas=0 returns at once. Fails before (ValueError: permits
    refused replicas=), and without the WAIT (returns at once)."""
    backend = RedisBackend.from_url(_url(topology), replicas=1)
    plain = RedisBackend.from_url(_url(topology))
    replicated, unreplicated = _permits(backend, shape), _permits(plain, shape)
    for locks, key in ((replicated, "r"), (unreplicated, "p")):
        locks.acquire_sync("warm-" + key, timeout=5).release_sync()  # connections, scripts
    stall = _stall(topology.replica(), 0.4)
    started = time.monotonic()
    lease = replicated.acquire_sync("r", timeout=5)
    assert time.monotonic() - started > 0.2
    assert lease._owner in _holders(topology, backend, "r")
    stall.join()
    stall = _stall(topology.replica(), 0.4)
    started = time.monotonic()
    other = unreplicated.acquire_sync("p", timeout=5)
    assert time.monotonic() - started < 0.2  # the stalled replica did not have it yet
    stall.join()
    lease.release_sync()
    other.release_sync()
    backend.close_sync()
    plain.close_sync()


async def test_without_the_replica_permit_grants_fail_and_leave_nothing_held(
    topology: SentinelTopology,
) -> None:
    """The replica killed: replicas=1 permit acquires (a semaphore's and an RW lock's, async,
    sync and a try) raise BackendUnavailable within about replica_timeout, and leave the key
    free: a replicas=0 client then takes all 3 permits at once."""
    backend = RedisBackend.from_url(_url(topology), replicas=1, replica_timeout=0.3)
    plain = RedisBackend.from_url(_url(topology))
    sem, rw = KeyedSemaphore(backend, limit=3), KeyedRWLock(backend)
    topology.kill_replica()
    poll(lambda: topology.primary().info("replication")["connected_slaves"] == 0, 5, "gone")
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: sem.acquire("k", timeout=5),
        lambda: asyncio.to_thread(sem.acquire_sync, "k", timeout=5),
        lambda: sem.acquire("k", timeout=0),
        lambda: rw.acquire_write("k", timeout=5),
        lambda: rw.acquire_read("k", timeout=0),
    ]
    others = KeyedSemaphore(plain, limit=3)
    for attempt in attempts:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="0 of the 1 replica") as caught:
            await attempt()
        named = "semaphore 'k'" if attempt in attempts[:3] else "RW lock 'k'"
        assert f"the grant of {named} reached" in str(caught.value)  # (it said "lock 'k'")
        assert time.monotonic() - started < 2.0
    leases = [await others.acquire("k", timeout=0) for _ in range(3)]  # nothing left held
    for lease in leases:
        await lease.release()
    assert not backend.permits(3, 1).statistics("k").held
    await backend.close()
    await plain.close()


def test_a_limit_mismatch_with_replicas_is_a_limit_mismatch(topology: SentinelTopology) -> None:
    """A replicas=1 acquire with another limit than the key's is refused with LimitMismatch,
    even while no replica answers: nothing was granted, so there is nothing to replicate or
    give back. Fails with the grant check that read any nonzero first element as a grant
    (the refusal's -1): BackendUnavailable "0 of the 1 replica"."""
    plain = KeyedSemaphore(RedisBackend.from_url(_url(topology)), limit=3)
    lease = plain.acquire_sync("k", timeout=5)
    backend = RedisBackend.from_url(_url(topology), replicas=1, replica_timeout=0.2)
    other = KeyedSemaphore(backend, limit=2)
    topology.kill_replica()
    poll(lambda: topology.primary().info("replication")["connected_slaves"] == 0, 5, "gone")
    with pytest.raises(LimitMismatch):
        other.acquire_sync("k", timeout=5)
    lease.release_sync()
    plain.close_sync()
    backend.close_sync()


@pytest.mark.parametrize("shape", ["sem3", "rw-writer"])
def test_a_permit_hand_off_returns_only_once_the_replica_has_it(
    topology: SentinelTopology, shape: str
) -> None:
    """A waiter handed a permit at a release (pub/sub) confirms it with the server, and its
    acquire returns only once the replica has it: the replica is stalled as a holder of the
    full key releases. Fails without the confirmation (the waiter adopts the message at once)."""
    holder_backend = RedisBackend.from_url(_url(topology), replicas=1)
    waiter_backend = RedisBackend.from_url(_url(topology), replicas=1)
    holders, waiter = _permits(holder_backend, shape), _permits(waiter_backend, shape)
    leases = [holders.acquire_sync("k", timeout=5) for _ in range(3 if shape == "sem3" else 1)]
    got: list[Lease] = []
    returned: list[float] = []

    def wait() -> None:
        got.append(waiter.acquire_sync("k", timeout=10))
        returned.append(time.monotonic())

    thread = threading.Thread(target=wait)
    thread.start()
    queue = holder_backend.layout.permit("k", b"")[2]
    poll(lambda: topology.primary().zcard(queue) == 1, 5, "the waiter queued")
    stall = _stall(topology.replica(), 0.5)
    leases[0].release_sync()  # (the key full until now: this release makes room)
    released = time.monotonic()
    thread.join(10)
    assert returned[0] - released > 0.25  # it waited for the stalled replica
    assert got[0]._owner in _holders(topology, holder_backend, "k")
    stall.join()
    for lease in (*leases[1:], got[0]):
        lease.release_sync()
    holder_backend.close_sync()
    waiter_backend.close_sync()


def test_an_unreplicated_permit_extend_leaves_it_at_risk_then_lost(
    topology: SentinelTopology,
) -> None:
    """The replica killed while a permit is held: extend() raises BackendUnavailable and
    leaves the permit's expiry as it was (held, not lost, until then); the renewer's extends
    are not replicated either, so the permit is reported lost (on_lost) by its last
    replicated expiry. Fails without the WAIT: extend succeeds and the permit lives on."""
    lost = threading.Event()
    # (a grant on a loaded host may take its replica most of a second: the timeout leaves room)
    backend = RedisBackend.from_url(_url(topology), ttl=3.0, replicas=1, replica_timeout=1.0)
    sem = KeyedSemaphore(backend, limit=3, on_lost=lambda lease: lost.set())
    lease = sem.acquire_sync("k", timeout=5)
    granted = time.monotonic()
    expires_at = lease.expires_at
    topology.kill_replica()
    with pytest.raises(BackendUnavailable, match="the extend of semaphore 'k' reached"):
        lease.extend_sync(10)  # (it said "lock 'k'")
    assert lease.expires_at == expires_at
    assert not lease.lost
    assert lost.wait(5)
    # by its expiry, plus the renewal in flight then (its WAIT: replica_timeout at most), the
    # renewer's next try (TTL / 10) and 0.5 s for a busy host
    assert time.monotonic() - granted < 3.0 + 1.0 + 0.3 + 0.5
    assert lease.lost
    backend.close_sync()


def test_a_permit_confirmation_always_writes() -> None:
    """The acquire that confirms a handed-over permit writes even when it changes nothing
    (the same expiry, within one ms): WAIT counts only the writes of its own connection, so
    a confirmation that wrote nothing would be acknowledged at once, the hand-off it
    confirms unreplicated. 200 re-grants pipelined with INFO between them: the replication
    offset moves at each. Fails on the script that wrote only a changed expiry (most
    re-grants in one ms moved nothing)."""
    with running_sentinel_topology(sentinels=0) as topology:
        client = topology.primary()
        backend = RedisBackend(client)
        keys = backend.layout.permit("k", b"o" * 16)
        args = [b"o" * 16, 60_000, "0", 4000, "ch", 4000, 3, 1, "k"]
        assert client.eval(PERMIT_ACQUIRE.text, len(keys), *keys, *args)[0] == 1
        pipe = client.pipeline(transaction=False)
        for _ in range(200):
            pipe.eval(PERMIT_ACQUIRE.text, len(keys), *keys, *args)
            pipe.info("replication")
        replies = pipe.execute()
        offsets = [info["master_repl_offset"] for info in replies[1::2]]
        assert all(reply[0] == 1 for reply in replies[0::2])
        assert all(b > a for a, b in itertools.pairwise(offsets)), offsets
        backend.close_sync()
        client.close()
