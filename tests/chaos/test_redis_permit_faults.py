"""Redis permits through server faults: a restart without persistence while permits are held
and waiters wait, and ``CLIENT KILL`` of the clients' connections (their pub/sub listeners
included) while they contend. For a semaphore of limit 3 and an RW lock, judged by the
history checker in permit mode: never more than the limit live, never a writer beside
anyone, tokens that never go back, no wait past its timeout, no permit stuck past its TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from keylock import BackendUnavailable, KeyedLock, Lease, LeaseLost, LockTimeout
from keylock.backends import RedisBackend
from keylock.backends.base import RW_LIMIT

from .._redis_server import Server, running_server
from ._history import Grant, History, Wait, believed_expiry
from ._report import Report, scaled

TTL = 1.0
TIMEOUT = 4.0
SLACK = 1.5  # one reconnection and one round trip past the deadline, at most
LIMITS = {"sem3": 3, "rw": RW_LIMIT}
# per shape: the holders' weights, then the waiters' (client B async, then client C sync)
PLAN = {"sem3": ([1, 1, 1], [1, 1, 1], [1]), "rw": ([1, 1], [RW_LIMIT, 1, 1], [1])}


async def _until_waiting(locks: KeyedLock, key: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while locks.statistics(key).waiting < count:
        assert time.monotonic() < deadline, f"{count} waiters never queued"
        await asyncio.sleep(0.005)


@dataclass
class _Tally:
    outcomes: dict[str, int] = field(default_factory=dict)
    lost_after: list[float] = field(default_factory=list)  # restart -> last on_lost, per trial

    def count(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


async def _restart_trial(
    own: Server, shape: str, history: History, tally: _Tally, trial: int
) -> None:
    """Fill the key, queue the waiters, restart the server empty, judge what follows."""
    limit = LIMITS[shape]
    holders_w, async_w, sync_w = PLAN[shape]
    lost_at: list[float] = []
    before: list[int] = []  # tokens granted before the restart
    after: list[int] = []  # and after it
    holder_backend, b, c = (RedisBackend.from_url(own.url, ttl=TTL) for _ in range(3))

    def locks(backend: RedisBackend, weight: int) -> KeyedLock:
        on_lost = (
            (lambda _: lost_at.append(time.monotonic())) if backend is holder_backend else None
        )
        return KeyedLock(backend.permits(limit, weight), on_lost=on_lost)

    held: list[tuple[Lease, Grant]] = []
    for n, weight in enumerate(holders_w):
        lease = await locks(holder_backend, weight).acquire("res", timeout=0)
        grant = Grant("res", lease.token, f"h{n}#{trial}", time.monotonic(), None, weight=weight)
        held.append((lease, history.granted(grant)))
        before.append(lease.token)

    async def wait(lock: KeyedLock, name: str, weight: int) -> None:
        asked = time.monotonic()
        try:
            lease = await lock.acquire("res", timeout=TIMEOUT)
        except (LockTimeout, BackendUnavailable) as exc:
            kind = "timeout" if isinstance(exc, LockTimeout) else "error"
            history.waited(Wait("res", name, asked, time.monotonic(), TIMEOUT, kind))
            tally.count(type(exc).__name__)
            return
        history.waited(Wait("res", name, asked, time.monotonic(), TIMEOUT, "granted"))
        tally.count("granted")
        after.append(lease.token)
        grant = history.granted(
            Grant("res", lease.token, name, time.monotonic(), None, asked_at=asked, weight=weight)
        )
        await asyncio.sleep(0.05)
        grant.expires_at = believed_expiry(lease)
        grant.released_at = time.monotonic()
        await lease.release()

    def wait_sync(lock: KeyedLock, name: str, weight: int) -> None:
        asyncio.run(wait(lock, name, weight))  # (its own loop, in its own thread)

    tasks = []
    for n, weight in enumerate(async_w):
        tasks.append(asyncio.create_task(wait(locks(b, weight), f"b{n}#{trial}", weight)))
        if n == 0:  # the first in line first (for RW: the writer)
            await _until_waiting(locks(b, weight), "res", 1)
    for n, weight in enumerate(sync_w):
        task = asyncio.to_thread(wait_sync, locks(c, weight), f"c{n}#{trial}", weight)
        tasks.append(asyncio.create_task(task))
    await _until_waiting(locks(b, 1), "res", len(async_w) + len(sync_w))
    restarted_at = time.monotonic()
    own.restart()  # every key gone: permits, the token counter, the line
    for _, grant in held:
        grant.voided_at = restarted_at
    await asyncio.gather(*tasks)
    deadline = time.monotonic() + TTL + 5
    while len(lost_at) < len(held):
        assert time.monotonic() < deadline, "a holder never learned"
        await asyncio.sleep(0.01)
    tally.lost_after.append(max(lost_at) - restarted_at)
    for lease, grant in held:
        grant.expires_at = believed_expiry(lease)
        grant.released_at = time.monotonic()
        with pytest.raises((LeaseLost, BackendUnavailable)):
            await lease.release()
    for backend in (holder_backend, b, c):
        await backend.close()
    assert all(token > max(before) for token in after)  # the clock, not the lost counter


@pytest.mark.parametrize("shape", list(LIMITS))
async def test_restart_without_data_with_permits_held_and_waiters_waiting(
    shape: str, chaos_report: Report
) -> None:
    """The key full (3 permits; or 2 readers), waiters queued (a writer first, for RW), then
    the server restarts empty. Every holder learns its permit is gone (``on_lost``; release
    raises LeaseLost), every waiter gets a permit or a clear error within its timeout plus a
    reconnection, tokens after the restart are above every token before it (the server
    clock, not the lost counter), and the checker finds nothing over the limit except
    permits the restart voided."""
    history = History(limit=LIMITS[shape])
    tally = _Tally()
    trials = scaled(2)
    with running_server() as own:
        for trial in range(trials):
            await _restart_trial(own, shape, history, tally, trial)
    verdict = history.check(slack=SLACK)
    holders_w, async_w, sync_w = PLAN[shape]
    chaos_report.record(
        "Redis restarted without persistence (permits held, waiters waiting)",
        f"redis {shape}, {len(holders_w)} holders + {len(async_w) + len(sync_w)} waiters",
        verdict,
        trials=trials,
        notes=f"all holders told lost (at most {max(tally.lost_after):.2f} s after); waiters: "
        + ", ".join(f"{n} {k}" for k, n in sorted(tally.outcomes.items())),
    )
    assert verdict.ok, verdict
    assert tally.outcomes.get("granted", 0) >= 1
    assert max(tally.lost_after) < TTL + 2


class _Killer:
    """A thread closing, every 1 ms to *every* s, one connection (at random) of the clients
    named *name*, their pub/sub listeners included."""

    def __init__(self, url: str, name: str, *, every: float, seed: int) -> None:
        self._client = redis.Redis.from_url(url)
        self._name = name
        self._every = every
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self.kills = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._rng.uniform(0.001, self._every)):
            victims = [c["id"] for c in self._client.client_list() if c["name"] == self._name]
            if victims:
                self.kills += self._client.client_kill_filter(_id=self._rng.choice(victims))

    @contextlib.contextmanager
    def running(self) -> Iterator[_Killer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)
            self._client.close()


@pytest.mark.parametrize("shape", list(LIMITS))
async def test_client_kill_while_permits_contend(
    shape: str, redis_server: Server, chaos_report: Report
) -> None:
    """Two clients, three workers each (for RW: one writer per client), cycle on one key
    while their connections are killed every few ms. Each acquire is granted or fails
    clearly (BackendUnavailable, LockTimeout) on time; each release works or fails clearly
    (LeaseLost, BackendUnavailable), and then its permit lapses at the TTL: the key is free
    again within a TTL of the end, and the checker finds nothing over the limit."""
    redis_server.flush()
    limit = LIMITS[shape]
    history = History(limit=limit)
    outcomes: dict[str, int] = {}
    rounds = scaled(15)
    backends = [
        RedisBackend.from_url(redis_server.url, ttl=0.6, client_name="permit-victim")
        for _ in range(2)
    ]

    def count(what: str) -> None:
        outcomes[what] = outcomes.get(what, 0) + 1

    async def worker(name: str, lock: KeyedLock, weight: int, seed: int) -> None:
        rng = random.Random(seed)
        for i in range(rounds):
            asked = time.monotonic()
            try:
                lease = await lock.acquire("res", timeout=TIMEOUT)
            except (LockTimeout, BackendUnavailable) as exc:
                kind = "timeout" if isinstance(exc, LockTimeout) else "error"
                history.waited(Wait("res", f"{name}#{i}", asked, time.monotonic(), TIMEOUT, kind))
                count(type(exc).__name__)
                continue
            history.waited(Wait("res", f"{name}#{i}", asked, time.monotonic(), TIMEOUT, "granted"))
            grant = history.granted(
                Grant(
                    "res",
                    lease.token,
                    f"{name}#{i}",
                    time.monotonic(),
                    None,
                    asked_at=asked,
                    weight=weight,
                )
            )
            await asyncio.sleep(rng.uniform(0.002, 0.01))
            grant.expires_at = believed_expiry(lease)
            grant.released_at = time.monotonic()
            try:
                await lease.release()
                count("released")
            except (LeaseLost, BackendUnavailable) as exc:
                count(f"release {type(exc).__name__}")

    workers = []
    for n, backend in enumerate(backends):
        for m in range(3):
            weight = limit if shape == "rw" and m == 0 else 1
            lock = KeyedLock(backend.permits(limit, weight))
            workers.append(worker(f"c{n}w{m}", lock, weight, seed=10 * n + m))
    with _Killer(redis_server.url, "permit-victim", every=0.02, seed=7).running() as killer:
        await asyncio.gather(*workers)
    ended = time.monotonic()
    view = RedisBackend.from_url(redis_server.url)
    while view.permits(limit, 1).statistics("res").holders:  # a lapse, not a stuck permit
        assert time.monotonic() - ended < 0.6 + 1.0
        await asyncio.sleep(0.01)
    await view.close()
    for backend in backends:
        await backend.close()
    verdict = history.check(slack=SLACK)
    chaos_report.record(
        "CLIENT KILL of permit clients' connections (listeners included) while contending",
        f"redis {shape}, 2 clients x 3 workers",
        verdict,
        trials=killer.kills,
        notes=", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())),
    )
    assert verdict.ok, verdict
    assert killer.kills > 0
    assert outcomes.get("released", 0) >= rounds
