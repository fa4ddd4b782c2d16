"""Shard failovers of a Redis Cluster with replicas while leases are held and waiters wait.

Each trial fails one shard over: most by ``CLUSTER FAILOVER`` (graceful), every fifth by
killing its primary, half of those while its replica lags (paused and cut off, so the grants
made meanwhile are not copied: the failover Kleppmann's argument is about). Holders hold two
keys of that shard across the failover; two other clients wait on each key and keep trying
(through errors) until they get it. The fenced store is a plain server that keeps its data,
as a real database would. Without ``replicas=`` the overlaps a lagging replica causes are
counted (and the fence rejects every stale write); with ``replicas=1`` there are none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis.cluster

from keylock import BackendUnavailable, KeyedLock, Lease, LeaseLost, LockTimeout
from keylock.backends import RedisBackend

from .._redis_cluster_topology import ReplicatedCluster, Shard, running_replicated_cluster
from .._redis_server import Server
from ._history import Grant, History, RedisFencedStore, Wait, believed_expiry
from ._report import SCALE, Report, scaled

FAULT = "Redis Cluster shard failover (leases held, waiters waiting)"
TTL = 3.0
TIMEOUT = 4.0  # each wait's
SLACK = 1.5  # a failover's refresh of the slot map and one round trip past the deadline
KILL_EVERY = 5  # every fifth failover kills the primary (the others: CLUSTER FAILOVER)
FAILOVERS = 25  # per case: 3 kills, 2 lagging; ten times as many in nox -s chaos


@pytest.fixture(scope="module")
def replicated() -> Iterator[ReplicatedCluster]:
    with running_replicated_cluster() as cluster:
        yield cluster


@dataclass
class _Tally:
    kinds: dict[str, int] = field(default_factory=dict)
    reported_lost: int = 0  # on_lost calls
    refused: int = 0  # grants refused because too few replicas acknowledged them
    outcomes: dict[str, int] = field(default_factory=dict)


class _Clients:
    """The clients of one case, shared by its trials: a holder, two waiters, a probe."""

    def __init__(
        self, cluster: ReplicatedCluster, store: RedisFencedStore, history: History, replicas: int
    ) -> None:
        self.store, self.history, self.tally = store, history, _Tally()
        self.lost_at: dict[tuple[str, int], float] = {}  # (key, token) -> on_lost
        options = {"cluster": True, "ttl": TTL, "replicas": replicas, "replica_timeout": 0.5}
        self.holders = KeyedLock(
            RedisBackend.from_url(cluster.url, **options),  # type: ignore[arg-type]
            on_lost=self._lost,
        )
        self.waiters = [
            KeyedLock(RedisBackend.from_url(cluster.url, **options))  # type: ignore[arg-type]
            for _ in range(2)
        ]
        self.probe = redis.cluster.RedisCluster.from_url(cluster.url)

    def _lost(self, lease: Lease) -> None:
        self.lost_at.setdefault((lease.key, lease.token), time.monotonic())
        self.tally.reported_lost += 1

    def close(self) -> None:
        for locks in (self.holders, *self.waiters):
            locks.close_sync()
        self.probe.close()


class _Trial:
    """One failover of *shard* with holders on two of its keys and two waiters per key."""

    def __init__(self, cluster: ReplicatedCluster, clients: _Clients, name: str) -> None:
        self.cluster, self.clients, self.name = cluster, clients, name
        self.store, self.history, self.tally = clients.store, clients.history, clients.tally
        self.holders, self.waiters = clients.holders, clients.waiters
        self.held: dict[str, tuple[Lease, Grant]] = {}
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()

    @property
    def lost_at(self) -> dict[str, float]:
        """When each key's holder learned its lease was lost, for the leases of this trial."""
        tokens = {key: lease.token for key, (lease, _) in self.held.items()}
        return {
            key: at for (key, token), at in self.clients.lost_at.items() if tokens.get(key) == token
        }

    def take(self, keys: list[str]) -> None:
        for key in keys:
            asked = time.monotonic()
            try:
                lease = self.holders.acquire_sync(key, timeout=5)
            except BackendUnavailable:  # (replicas=1 and a replica cut off: refused)
                self.tally.refused += 1
                continue
            holder = f"holder:{key}#{self.name}"
            assert self.store.write_sync(key, lease.token, holder, "holder")
            grant = Grant(key, lease.token, holder, time.monotonic(), None, asked_at=asked)
            self.held[key] = lease, self.history.granted(grant)

    def start_waiters(self, keys: list[str]) -> None:
        for key in keys:
            for n, locks in enumerate(self.waiters):
                name = f"waiter-{n}:{key}#{self.name}"
                # (daemon: a test that failed must not keep the interpreter from exiting)
                thread = threading.Thread(target=self._wait, args=(locks, key, name), daemon=True)
                thread.start()
                self.threads.append(thread)

    def _wait(self, locks: KeyedLock, key: str, name: str) -> None:
        while not self.stop.is_set():
            asked = time.monotonic()
            try:
                lease = locks.acquire_sync(key, timeout=TIMEOUT)
            except (LockTimeout, BackendUnavailable) as exc:
                self._record(key, name, asked, type(exc).__name__)
                self.stop.wait(0.05)  # (a back-off between tries, not a wait for something)
                continue
            self._record(key, name, asked, "granted")
            self.store.write_sync(key, lease.token, name, "waiter")
            grant = self.history.granted(
                Grant(key, lease.token, name, time.monotonic(), None, asked_at=asked)
            )
            time.sleep(0.02)  # the critical section
            self.store.write_sync(key, lease.token, name, "waiter, again")
            grant.expires_at = believed_expiry(lease)
            grant.released_at = time.monotonic()
            try:
                lease.release_sync()
            except LeaseLost:
                pass  # (counted by the checker if anyone overlapped it)
            return

    def _record(self, key: str, name: str, asked: float, outcome: str) -> None:
        kind = {"LockTimeout": "timeout", "BackendUnavailable": "error"}.get(outcome, outcome)
        self.history.waited(Wait(key, name, asked, time.monotonic(), TIMEOUT, kind))
        self.tally.outcomes[outcome] = self.tally.outcomes.get(outcome, 0) + 1

    def queued(self, keys: list[str]) -> None:
        """Until a waiter of each client is in each key's queue on Redis (bounded poll)."""
        probe = self.clients.probe
        deadline = time.monotonic() + 10
        layout = self.holders.backend.layout  # type: ignore[attr-defined]
        for key in keys:
            if key not in self.held:
                continue  # (refused: the waiters may hold it already)
            while probe.zcard(layout.lock(key)[2]) < len(self.waiters):
                assert time.monotonic() < deadline, f"waiters never queued on {key!r}"
                time.sleep(0.005)

    def hold_through(self, failed_over: float, hold: float) -> None:
        """Each holder holds until its lease is reported lost or *hold* s after the
        failover, then writes once more with its token (rejected if a later token wrote)
        and releases."""
        for key, (lease, grant) in self.held.items():
            while key not in self.lost_at and time.monotonic() < failed_over + hold:
                time.sleep(0.01)
            lost_at = self.lost_at.get(key)
            if lost_at is None:
                self.store.write_sync(key, lease.token, grant.holder, "holder, again")
            grant.expires_at = believed_expiry(lease)
            grant.released_at = lost_at or time.monotonic()  # when it stopped believing
            try:
                lease.release_sync()
            except (LeaseLost, BackendUnavailable):
                pass

    def finish(self) -> None:
        for thread in self.threads:
            thread.join(TIMEOUT + 15)
        self.stop.set()
        for thread in self.threads:
            thread.join(TIMEOUT + 5)
            assert not thread.is_alive(), "a waiter hung"


def _failover(cluster: ReplicatedCluster, trial: _Trial, shard: Shard, kind: str) -> None:
    keys = cluster.lock_keys_on(shard, 2)
    if kind == "lagging":

        def lagging() -> None:
            trial.take(keys)
            trial.start_waiters(keys)
            trial.queued(keys)

        cluster.kill_primary_while_replica_lags(shard, lagging)
    else:
        trial.take(keys)
        trial.start_waiters(keys)
        trial.queued(keys)
        (cluster.failover if kind == "graceful" else cluster.kill_primary)(shard)
    trial.hold_through(time.monotonic(), 0.1 if kind == "graceful" else 0.5)
    cluster.revive()  # (a killed node comes back as a replica)
    trial.finish()


@pytest.mark.timeout(150 * SCALE)  # about 25 s per 25 failovers on 2 busy cores
@pytest.mark.parametrize("replicas", [0, 1], ids=["replicas=0", "replicas=1"])
def test_shard_failovers_with_leases_held_and_waiters_waiting(
    replicated: ReplicatedCluster, redis_server: Server, chaos_report: Report, replicas: int
) -> None:
    """FAILOVERS shard failovers (scaled), one shard after another, every fifth a kill and
    half of those while the replica lags. In every case: no stale write accepted by the
    fence, no token regression (tokens come from the server clock, which the failover does
    not turn back), no wait past its timeout plus a slack. With ``replicas=1``: no overlap.
    Without it the overlaps are counted; a lagging replica's failover makes some (the
    checker sees them: the control that this test can tell)."""
    redis_server.flush()
    replicated.revive()
    replicated.flush()
    history = History()
    store = RedisFencedStore(history, redis_server.url)
    clients = _Clients(replicated, store, history, replicas)
    tally = clients.tally
    failovers = scaled(FAILOVERS)
    started = time.monotonic()
    for n in range(failovers):
        kind = "graceful"
        if n % KILL_EVERY == KILL_EVERY - 1:
            kind = "kill" if (n // KILL_EVERY) % 2 == 0 else "lagging"
        tally.kinds[kind] = tally.kinds.get(kind, 0) + 1
        shard = replicated.shards()[n % 3]
        _failover(replicated, _Trial(replicated, clients, f"{n}"), shard, kind)
    took = time.monotonic() - started
    clients.close()
    store._sync.close()
    verdict = history.check(slack=SLACK)
    chaos_report.record(
        FAULT,
        f"redis-cluster 3x2, replicas={replicas}",
        verdict,
        trials=failovers,
        notes=", ".join(f"{n} {kind}" for kind, n in sorted(tally.kinds.items()))
        + f"; {tally.reported_lost} leases reported lost, {tally.refused} grants refused "
        f"(too few replicas); waiters: "
        + ", ".join(f"{n} {k}" for k, n in sorted(tally.outcomes.items()))
        + f"; {took:.0f} s",
    )
    assert not verdict.stale_writes_accepted, verdict.stale_writes_accepted
    assert not verdict.token_regressions, verdict.token_regressions
    assert not verdict.hangs, verdict.hangs
    assert tally.outcomes.get("granted", 0) >= failovers  # the waiters got on
    if replicas:
        assert not verdict.overlaps, verdict.overlaps
        assert tally.refused >= tally.kinds.get("lagging", 0)  # each lagging trial refused
    elif tally.kinds.get("lagging"):
        assert verdict.overlaps  # the risk replicas=1 removes, seen
