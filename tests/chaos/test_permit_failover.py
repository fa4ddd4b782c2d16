"""Failovers while Redis permits are held and waiters wait: a semaphore of 3 and an RW lock,
on a primary + 2 replicas + 3 Sentinels, and on a Cluster with a replica per shard.

Each trial fills the key (3 permits; or a writer), queues two waiters (for RW: a reader,
then a writer), fails the primary over, and sends takers (readers, for RW) after the
promotion while the holders still hold: a taker granted then is more than the limit, or a
reader beside the writer. Sentinel trials alternate a kill with replication in step and one
with replication cut before the grants (the replicas frozen and cut off); Cluster trials
rotate ``CLUSTER FAILOVER``, a kill, and a kill while the shard's replica lags. The history
checker judges in permit mode. With ``replicas=1`` a permit no replica acknowledged is given
back, so nothing goes over the limit; without it (the Sentinel control, recorded, not
asserted: a loaded host may let the holders' believed expiry pass first), the cut trials'
permits are lost in the failover and the checker usually sees the takers over the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from keylock import BackendUnavailable, KeyedLock, Lease, LeaseLost, LockTimeout
from keylock.backends import RedisBackend
from keylock.backends.base import RW_LIMIT

from .._redis_cluster_topology import ReplicatedCluster, running_replicated_cluster
from .._redis_topology import SentinelTopology, running_sentinel_topology
from ._history import Grant, History, Wait, believed_expiry
from ._report import SCALE, Report, scaled

TTL = 6.0  # a holder believes in its permit through the failover (renewed every 2 s)
TIMEOUT = 6.0
SLACK = 2.0  # a trip through the failover: discovery and a reconnection
HOLD = 1.5  # holders hold this long after the failover
FAULT = "Redis failover with permits held and waiters waiting"
# shape -> limit, then the weights of the holders, the waiters and the takers
SHAPES = {
    "sem3": (3, [1, 1, 1], [1, 1], [1, 1]),
    "rw": (RW_LIMIT, [RW_LIMIT], [1, RW_LIMIT], [1, 1]),
}


@pytest.fixture(scope="module", autouse=True)
def _collected_last() -> Iterator[None]:
    """Torn down after the topologies (set up first): what the failovers and the topologies
    left unclosed is collected inside this module's last test, whose warnings filter covers
    it, not in the next module's first test (a CI run failed the Sentinel row that way)."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SentinelTopology]:
    with running_sentinel_topology(replicas=2) as topology:
        yield topology


@pytest.fixture(scope="module")
def cluster() -> Iterator[ReplicatedCluster]:
    with running_replicated_cluster() as cluster:
        yield cluster


@dataclass
class _Tally:
    failovers: int = 0
    granted: int = 0  # holders' permits granted before the failover
    granted_cut: int = 0  # ... while replication was cut (no replica can have them)
    refused: int = 0  # holders refused (replicas=1: too few replicas acknowledged)
    lost: int = 0  # holders' permits reported lost (on_lost)
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


async def _trial(
    url: str,
    options: dict[str, object],
    shape: str,
    key: str,
    history: History,
    tally: _Tally,
    name: str,
    fail: Callable[[Callable[[], None]], bool],
) -> None:
    """One failover: *fail(prepare)* (in a thread) runs *prepare* (grants, waiters queued)
    and fails the primary over; it returns whether replication was cut meanwhile."""
    limit, holders_w, waiters_w, takers_w = SHAPES[shape]
    loop = asyncio.get_running_loop()
    lost: dict[int, float] = {}  # token -> on_lost
    holders, waiters, takers, probe = (RedisBackend.from_url(url, **options) for _ in range(4))  # type: ignore[arg-type]

    def locks(backend: RedisBackend, weight: int) -> KeyedLock:
        return KeyedLock(
            backend.permits(limit, weight),
            on_lost=lambda lease: lost.setdefault(lease.token, time.monotonic()),
        )

    held: list[tuple[Lease, Grant]] = []
    tasks: list[asyncio.Task[None]] = []
    cut_grants: list[int] = []

    async def wait(backend: RedisBackend, who: str, weight: int, timeout: float) -> None:
        asked = time.monotonic()
        try:
            lease = await locks(backend, weight).acquire(key, timeout=timeout)
        except (LockTimeout, BackendUnavailable) as exc:
            kind = "timeout" if isinstance(exc, LockTimeout) else "error"
            history.waited(Wait(key, who, asked, time.monotonic(), timeout, kind))
            tally.count(f"{who.split(':')[0]} {type(exc).__name__}")
            return
        history.waited(Wait(key, who, asked, time.monotonic(), timeout, "granted"))
        tally.count(f"{who.split(':')[0]} granted")
        grant = Grant(key, lease.token, who, time.monotonic(), None, asked_at=asked, weight=weight)
        history.granted(grant)
        await asyncio.sleep(0.05)
        grant.expires_at = believed_expiry(lease)
        grant.released_at = time.monotonic()
        with contextlib.suppress(LeaseLost, BackendUnavailable):
            await lease.release()

    async def prepare() -> None:
        for n, weight in enumerate(holders_w):
            asked = time.monotonic()
            try:
                lease = await locks(holders, weight).acquire(key, timeout=2)
            except BackendUnavailable:
                tally.refused += 1  # (replicas=1 with replication cut: given back, not held)
                continue
            tally.granted += 1
            cut_grants.append(lease.token)
            grant = Grant(key, lease.token, f"holder{n}:{name}", time.monotonic(), None)
            grant.asked_at, grant.weight = asked, weight
            held.append((lease, history.granted(grant)))
        for n, weight in enumerate(waiters_w):
            tasks.append(asyncio.create_task(wait(waiters, f"waiter:{n}#{name}", weight, TIMEOUT)))
            if len(held) == len(holders_w):  # (the key full: they queue, one after the other)
                view = probe.permits(limit, 1)
                for _ in range(1000):
                    if view.statistics(key).waiting > n:
                        break
                    await asyncio.sleep(0.005)

    def prepare_sync() -> None:
        asyncio.run_coroutine_threadsafe(prepare(), loop).result(20)

    cut = await asyncio.to_thread(fail, prepare_sync)
    tally.failovers += 1
    if cut:
        tally.granted_cut += len(cut_grants)
    tasks += [
        asyncio.create_task(wait(takers, f"taker:{n}#{name}", weight, HOLD - 0.5))
        for n, weight in enumerate(takers_w)
    ]

    async def hold_on(lease: Lease, grant: Grant) -> None:
        """The holder goes on (as a worker that saw no error would): its permit counts
        until its release or the expiry it believes in."""
        await asyncio.sleep(HOLD)
        grant.expires_at = believed_expiry(lease)
        grant.released_at = time.monotonic()
        with contextlib.suppress(LeaseLost, BackendUnavailable):
            await lease.release()

    await asyncio.gather(*tasks, *(hold_on(*pair) for pair in held))
    tally.lost += sum(lease.token in lost for lease, _ in held)
    for backend in (holders, waiters, takers, probe):
        await backend.close()


def _judge(history: History, tally: _Tally, chaos_report: Report, case: str, replicas: int) -> None:
    verdict = history.check(slack=SLACK)
    chaos_report.record(
        FAULT,
        case,
        verdict,
        trials=tally.failovers,
        notes=f"holders: {tally.granted} granted ({tally.granted_cut} while replication was "
        f"cut), {tally.refused} refused (too few replicas), {tally.lost} reported lost; "
        + ", ".join(f"{n} {k}" for k, n in sorted(tally.outcomes.items())),
    )
    assert not verdict.token_regressions, verdict.token_regressions
    assert not verdict.hangs, verdict.hangs
    if replicas:
        assert not verdict.overlaps, verdict.overlaps  # never over the limit, nor beside a writer
        assert tally.granted_cut == 0  # never a permit that no replica has
        assert tally.refused > 0  # (the cut trials ran: their grants were refused)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("replicas", [0, 1], ids=["replicas=0", "replicas=1"])
@pytest.mark.parametrize("shape", list(SHAPES))
async def test_sentinel_failover_with_permits_held(
    sentinel: SentinelTopology, chaos_report: Report, shape: str, replicas: int
) -> None:
    """Kill the primary while the key is full and two waiters wait; every other trial, with
    replication cut first. With replicas=1: no taker over the limit or beside a writer, no
    permit granted while replication was cut (each was given back), tokens never go back,
    no wait past its timeout. Checked to fail with replicas=1 but no WAIT for permits (the
    cut trials' permits are granted, lost in the failover, and the takers go over the
    limit: the replicas=0 control shows it)."""
    history = History(limit=SHAPES[shape][0])
    tally = _Tally()
    options = {"ttl": TTL, "replicas": replicas, "replica_timeout": 0.3}
    for trial in range(scaled(2)):
        cut = trial % 2 == 1
        killed: list[int] = []

        def fail(prepare: Callable[[], None], cut: bool = cut, killed: list[int] = killed) -> bool:
            if cut:
                sentinel.pause_replicas()
            prepare()
            killed.append(sentinel.kill_primary())
            if cut:
                sentinel.resume_replicas()
            sentinel.wait_for_promotion(killed[0])
            return cut

        sentinel.primary().flushall()
        await _trial(sentinel.url, options, shape, "res", history, tally, f"{trial}", fail)
        await asyncio.to_thread(sentinel.restore, killed[0])
    gc.collect()  # (what the failovers left unclosed is collected here, not in a later test)
    _judge(history, tally, chaos_report, f"redis Sentinel {shape}, replicas={replicas}", replicas)


# redis-py's async Cluster nodes, connections and sockets that leave the slot map in a
# failover are collected unclosed (the lock rows use sync clients): a hygiene question for the
# async Cluster client (or keylock's slot-map refresh), not what this row judges; left open
# in the report that added the row.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.timeout(240 * SCALE)
@pytest.mark.parametrize("shape", list(SHAPES))
async def test_cluster_failover_with_permits_held(
    cluster: ReplicatedCluster, chaos_report: Report, shape: str
) -> None:
    """Shard failovers of a Cluster with replicas=1 while a key of the shard is full and two
    waiters wait: a graceful CLUSTER FAILOVER, a kill, and a kill while the replica lags,
    in turn. No taker over the limit or beside a writer, no permit granted while the replica
    lagged (given back), tokens never go back, no wait past its timeout."""
    history = History(limit=SHAPES[shape][0])
    tally = _Tally()
    cluster.revive()
    cluster.flush()
    options = {"cluster": True, "ttl": TTL, "replicas": 1, "replica_timeout": 0.5}
    kinds = ["graceful", "kill", "lagging"]
    for trial in range(scaled(3)):
        kind = kinds[trial % 3]
        shard = cluster.shards()[trial % 3]
        key = cluster.lock_keys_on(shard, 1)[0]

        def fail(prepare: Callable[[], None], kind: str = kind, shard: object = shard) -> bool:
            if kind == "lagging":
                cluster.kill_primary_while_replica_lags(shard, prepare)  # type: ignore[arg-type]
                return True
            prepare()
            (cluster.failover if kind == "graceful" else cluster.kill_primary)(shard)  # type: ignore[arg-type]
            return False

        await _trial(cluster.url, options, shape, key, history, tally, f"{trial}", fail)
        await asyncio.to_thread(cluster.revive)
    gc.collect()  # (what the failovers left unclosed is collected here, not in a later test)
    _judge(history, tally, chaos_report, f"redis-cluster 3x2 {shape}, replicas=1", 1)
