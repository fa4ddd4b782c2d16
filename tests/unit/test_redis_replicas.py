"""``replicas=N``: a grant, an extend and a hand-off count only once N replicas acknowledged
them (WAIT on the script's connection), on a real primary + replica the test starts."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from keylock import BackendUnavailable, KeyedLock, Lease
from keylock.backends import RedisBackend
from keylock.backends.redis._scripts import EXTEND
from keylock.backends.redis._wire import Arg, SyncWire

from .._redis_server import Server
from .._redis_topology import SentinelTopology, poll, running_sentinel_topology


@pytest.fixture(params=["primary", "sentinel"])
def topology(request: pytest.FixtureRequest) -> Iterator[SentinelTopology]:
    """A primary and one replica of its own (tests kill or stall the replica), reached at
    the primary's address or through three Sentinels (``url``)."""
    sentinels = 3 if request.param == "sentinel" else 0
    with running_sentinel_topology(sentinels=sentinels) as topology:
        yield topology


def _url(topology: SentinelTopology) -> str:
    return topology.url if topology.sentinels else topology.primary_url


def _stall(replica: redis.Redis, seconds: float) -> threading.Thread:
    """The replica does nothing (no acknowledgement either) for *seconds*, from now."""
    thread = threading.Thread(target=replica.execute_command, args=("DEBUG", "SLEEP", seconds))
    thread.start()
    poll(lambda: not _answers(replica.connection_pool.connection_kwargs["port"]), 2, "stalled")
    return thread


def _answers(port: int) -> bool:
    try:
        redis.Redis(port=port, socket_timeout=0.05, retry=Retry(NoBackoff(), 0)).ping()
    except redis.RedisError:
        return False
    return True


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"replicas": True}, TypeError, "replicas must be an int"),
        ({"replicas": "1"}, TypeError, "replicas must be an int"),
        ({"replicas": 1.0}, TypeError, "replicas must be an int"),
        ({"replicas": -1}, ValueError, "must be 0"),
        ({"replicas": 1, "replica_timeout": 0}, ValueError, "replica_timeout"),
        ({"replicas": 1, "replica_timeout": math.nan}, ValueError, "replica_timeout"),
        ({"replicas": 1, "replica_timeout": "1"}, TypeError, "replica_timeout"),
        ({"replicas": 1, "replica_timeout": 5, "ttl": 5}, ValueError, "shorter"),
    ],
)
def test_replicas_and_replica_timeout_are_checked(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    """Bad values fail at construction with the fix in the message, from_url and the
    constructor alike (no server is needed: nothing is sent)."""
    with pytest.raises(error, match=match):
        RedisBackend(redis.Redis(port=1), **options)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        RedisBackend.from_url("redis://127.0.0.1:1/0", **options)  # type: ignore[arg-type]


def test_a_grant_returns_only_once_the_replica_has_it(topology: SentinelTopology) -> None:
    """With the replica stalled for 0.4 s, a replicas=1 acquire returns only after it woke and
    holds the lease; replicas=0 returns at once, while the stalled replica cannot have it
    (what a failover then would lose). Fails without the WAIT: the first acquire returns at
    once."""
    replicated = KeyedLock(RedisBackend.from_url(_url(topology), replicas=1))
    plain = KeyedLock(RedisBackend.from_url(_url(topology)))
    replica = topology.replica()
    for locks, key in ((replicated, "r"), (plain, "p")):
        locks.acquire_sync("warm-" + key, timeout=5).release_sync()  # connections, scripts
    lock_key = replicated.backend.layout.lock("r")[0]  # type: ignore[attr-defined]
    stall = _stall(replica, 0.4)
    started = time.monotonic()
    lease = replicated.acquire_sync("r", timeout=5)
    took = time.monotonic() - started
    assert replica.get(lock_key) == lease._owner
    assert took > 0.2, took
    stall.join()
    stall = _stall(replica, 0.4)
    started = time.monotonic()
    other = plain.acquire_sync("p", timeout=5)
    assert time.monotonic() - started < 0.2  # the stalled replica did not have it yet
    stall.join()
    lease.release_sync()
    other.release_sync()
    replicated.close_sync()
    plain.close_sync()


async def test_without_the_replica_grants_fail_and_leave_nothing_locked(
    topology: SentinelTopology,
) -> None:
    """The replica killed: replicas=1 acquires (async, sync, and a try with timeout=0) raise
    BackendUnavailable naming the server within about replica_timeout, and the key is left
    free (a replicas=0 client takes it at once)."""
    backend = RedisBackend.from_url(_url(topology), replicas=1, replica_timeout=0.3)
    locks = KeyedLock(backend)
    plain = KeyedLock(RedisBackend.from_url(_url(topology)))
    topology.kill_replica()
    poll(lambda: topology.primary().info("replication")["connected_slaves"] == 0, 5, "gone")
    where = "Sentinel service" if topology.sentinels else f"127.0.0.1:{topology.primary_port}"
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: locks.acquire("k", timeout=5),
        lambda: asyncio.to_thread(locks.acquire_sync, "k", timeout=5),
        lambda: locks.acquire("k", timeout=0),
    ]
    for attempt in attempts:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="0 of the 1 replica") as caught:
            await attempt()
        assert time.monotonic() - started < 2.0
        assert where in str(caught.value)
        lease = await plain.acquire("k", timeout=0)  # nothing left locked
        await lease.release()
    assert not backend.statistics("k").held
    await locks.close()
    await plain.close()


def test_an_unreplicated_extend_leaves_the_lease_at_risk_then_lost(
    topology: SentinelTopology,
) -> None:
    """The replica killed while a lease is held: extend() raises BackendUnavailable and
    leaves the lease's expiry as it was (held, not lost, until then); the renewer's extends
    are not replicated either, so the lease is reported lost (on_lost) by its last
    replicated expiry. Fails without the WAIT: extend succeeds and the lease lives on."""
    lost = threading.Event()
    ttl = 3.0

    def on_lost(lease: Lease) -> None:
        lost.set()

    # (a replica_timeout with room for a loaded host: the grant itself must be acknowledged;
    # a CI run with two workers saw 0.4 s pass before the live replica's ack; the TTL keeps
    # its ratio to it, 3.75, so the renewer's failed extends still leave it held a while)
    locks = KeyedLock(
        RedisBackend.from_url(_url(topology), ttl=ttl, replicas=1, replica_timeout=0.8),
        on_lost=on_lost,
    )
    try:  # (closed even when it fails: an unclosed backend would fail a later test)
        lease = locks.acquire_sync("k", timeout=5)
        granted = time.monotonic()
        expires_at = lease.expires_at
        topology.kill_replica()
        with pytest.raises(BackendUnavailable, match="extend"):
            lease.extend_sync(10)
        assert lease.expires_at == expires_at
        assert not lease.lost
        assert lost.wait(5)
        assert time.monotonic() - granted < ttl + 0.5
        assert lease.lost
    finally:
        locks.close_sync()


def test_a_hand_off_returns_only_once_the_replica_has_it(topology: SentinelTopology) -> None:
    """A waiter handed the key at a release (pub/sub) confirms it with the server, and its
    acquire returns only once the replica has it: the replica is stalled as the holder
    releases, and the waiter's acquire returns only once the replica woke and has it. Fails
    without the confirmation: the waiter adopts the hand-off message at once."""
    holder = KeyedLock(RedisBackend.from_url(_url(topology), replicas=1))
    waiter = KeyedLock(RedisBackend.from_url(_url(topology), replicas=1))
    replica = topology.replica()
    lease = holder.acquire_sync("k", timeout=5)
    got: list[Lease] = []
    returned: list[float] = []

    def wait() -> None:
        got.append(waiter.acquire_sync("k", timeout=10))
        returned.append(time.monotonic())

    thread = threading.Thread(target=wait)
    thread.start()
    queue = holder.backend.layout.lock("k")[2]  # type: ignore[attr-defined]
    poll(lambda: topology.primary().zcard(queue) == 1, 5, "the waiter queued")
    stall = _stall(replica, 0.5)
    lease.release_sync()
    released = time.monotonic()
    thread.join(10)
    assert returned[0] - released > 0.25  # it waited for the stalled replica
    lock_key = holder.backend.layout.lock("k")[0]  # type: ignore[attr-defined]
    assert replica.get(lock_key) == got[0]._owner
    stall.join()
    got[0].release_sync()
    holder.close_sync()
    waiter.close_sync()


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_batch_with_wait_on_a_server_without_the_script(
    redis_server: Server, pipelined: bool
) -> None:
    """The renewer's batch (EXTENDs, then WAIT) on a server that lost its scripts: the texts
    are sent again and the WAIT's reply comes last, once. Fails before the fix: the renewal
    raised ``zip() argument 2 is longer than argument 1`` (the WAIT's reply counted as one
    of the EXTENDs), and a lease renewed after a failover was reported lost."""
    client = redis.Redis.from_url(redis_server.url)
    client.script_flush()
    wire = SyncWire(client)
    if pipelined:
        wire._pool = None  # through the client's own pipeline (Cluster, other pools)
    calls: list[tuple[list[str], list[Arg]]] = [
        ([f"k{n}", "f", "u"], ["o", 1000, 2000, 3000]) for n in range(3)
    ]
    replies = wire.call_many(EXTEND, calls, ("WAIT", 0, 10))
    assert replies == [0, 0, 0, 0]  # three "not ours", then WAIT: 0 replicas
    wire.close()
    client.close()
