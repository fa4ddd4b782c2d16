"""Crowds on one key: 10,000 asyncio waiters in memory, 500 on Redis and on Postgres across
five clients.

Every waiter is served in arrival order or times out on time; the history checker sees no
overlap; afterwards nothing is left: no key, no queue entry, and (in memory) no byte kept by
keylock's own code, measured with ``tracemalloc``. This supersedes the unit test that only
counted 10,000 served waiters.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import tracemalloc
from collections.abc import Callable

import redis

import keylock
from keylock import KeyedLock, LockTimeout
from keylock.backends import MemoryBackend, PostgresBackend, RedisBackend
from keylock.backends.memory import _WAITERS

from .._pg_server import PgServer
from .._redis_server import Server
from ._history import Grant, History, Verdict, Wait
from ._report import Report, scaled

SHORT = 0.2  # the timeout of every tenth waiter: it runs out while the holder still holds
SLACK = 1.0


_PACKAGE = os.path.dirname(keylock.__file__)


def _keylock_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated by keylock's own code (innermost frame in the keylock package)."""
    # the package's own directory: a checkout named keylock/ would match "*/keylock/*" with
    # this test file's allocations too
    mine = snapshot.filter_traces([tracemalloc.Filter(True, f"{_PACKAGE}/*")])
    return sum(stat.size for stat in mine.statistics("filename"))


async def _woken(alarm: asyncio.Future[None]) -> float:
    """When this task resumed after *alarm* was set."""
    await alarm
    return time.monotonic()


async def _crowd(
    locks: list[KeyedLock],
    key: str,
    count: int,
    history: History,
    hold: KeyedLock,
    on_queued: Callable[[], None] | None = None,
) -> tuple[dict[int, list[int]], list[int]]:
    """*count* waiters, spread over *locks* in turn, queue behind a lease held through *hold*;
    every tenth has a short timeout. The holder lets go once the short ones have timed out
    (*on_queued* runs then). Returns the order in which each client's waiters were served,
    and the timed-out ones."""
    holder = await hold.acquire(key)
    first = history.granted(Grant(key, holder.token, "holder", time.monotonic(), None))
    served: dict[int, list[int]] = {n: [] for n in range(len(locks))}
    timed_out: list[int] = []

    loop = asyncio.get_running_loop()

    async def waiter(i: int) -> None:
        timeout = SHORT if i % 10 == 5 else 120.0
        asked = time.monotonic()
        # A control task woken by a timer for the same deadline, the way a waiter's timeout
        # wakes it: on a starved host (10,000 tasks, load 13 on 2 cores) the loop resumes it
        # late, and a waiter is on time if it gives up within the slack of that control.
        control = None
        if timeout == SHORT:
            alarm = loop.create_future()
            loop.call_later(timeout, alarm.set_result, None)
            control = loop.create_task(_woken(alarm))
        try:
            lease = await locks[i % len(locks)].acquire(key, timeout=timeout)
        except LockTimeout:
            ended = time.monotonic()
            late = 0.0 if control is None else max(await control - (asked + timeout), 0.0)
            history.waited(Wait(key, f"w{i}", asked + late, ended, timeout, "timeout"))
            timed_out.append(i)
            return
        history.waited(Wait(key, f"w{i}", asked, time.monotonic(), timeout, "granted"))
        grant = history.granted(
            Grant(key, lease.token, f"w{i}", time.monotonic(), None, asked_at=asked)
        )
        served[i % len(locks)].append(i)
        await asyncio.sleep(0)
        grant.released_at = time.monotonic()
        await lease.release()

    tasks = []
    for i in range(count):
        tasks.append(asyncio.create_task(waiter(i)))
        if i % 100 == 99:
            await asyncio.sleep(0)  # let each hundred queue before the next arrives
    await asyncio.gather(*(t for i, t in enumerate(tasks) if i % 10 == 5))
    if on_queued is not None:
        on_queued()
    first.released_at = time.monotonic()
    await holder.release()
    await asyncio.gather(*tasks)
    return served, timed_out


async def _measured_crowd(locks: KeyedLock) -> tuple[int, int, Verdict]:
    """One crowd of 10,000 under tracemalloc: keylock's bytes while 9,000 wait, and after;
    and the checker's verdict on its history."""
    history = History()
    gc.collect()
    tracemalloc.start()
    before = _keylock_bytes(tracemalloc.take_snapshot())
    peak = 0

    def measure() -> None:  # 9,000 still queued (the other 1,000 timed out)
        nonlocal peak
        assert locks.statistics("crowd").waiting == 9_000
        peak = _keylock_bytes(tracemalloc.take_snapshot()) - before

    served, timed_out = await _crowd([locks], "crowd", 10_000, history, locks, measure)
    assert served[0] == [i for i in range(10_000) if i % 10 != 5]  # FIFO
    assert sorted(timed_out) == [i for i in range(10_000) if i % 10 == 5]
    verdict = history.check(slack=SLACK)
    del history, served, timed_out  # the grants keep the tokens keylock minted: not keylock's
    gc.collect()
    retained = _keylock_bytes(tracemalloc.take_snapshot()) - before
    tracemalloc.stop()
    return peak, retained, verdict


async def test_ten_thousand_waiters_on_one_key_in_memory(chaos_report: Report) -> None:
    """10,000 asyncio tasks wait for one key held by another; every tenth gives up after
    0.2 s, on time; the rest are served one by one in arrival order (FIFO: a lock that let a
    woken task barge, or woke waiters in another order, breaks it). keylock holds a bounded
    number of bytes per waiter while they wait, and none once they are gone (what stays is
    CPython's free list of 255 future iterators, about 10 KB)."""
    backend = MemoryBackend()
    locks = KeyedLock(backend)
    for i in range(200):  # warm up allocator pools
        async with locks(f"warm:{i}"):
            pass
    worst_peak = worst_retained = 0
    for _ in range(scaled(1)):
        peak, retained, verdict = await _measured_crowd(locks)
        worst_peak, worst_retained = max(worst_peak, peak), max(worst_retained, retained)
        chaos_report.record(
            "Crowds on one key",
            "memory, 10,000 asyncio waiters",
            verdict,
            trials=1,
            notes=f"FIFO; at most {worst_peak / 9_000:.0f} bytes of keylock state per queued "
            f"waiter, {max(worst_retained, 0):,} bytes retained after",
        )
        assert verdict.ok, verdict
        assert (verdict.timed_out, verdict.waits["granted"]) == (1_000, 9_000)
        stats = locks.statistics("crowd")
        assert (stats.held, stats.waiting, len(backend)) == (False, 0, 0)
        assert peak / 9_000 < 2_000
        assert retained < 20_000  # nothing per waiter: a few pooled objects at most


async def test_five_hundred_waiters_on_one_key_on_redis(
    redis_server: Server, chaos_report: Report
) -> None:
    """500 asyncio waiters over five clients queue on one Redis key held by a sixth; every
    tenth gives up after 0.2 s, on time; the rest are all served, each client's in its own
    arrival order (the clients' turns interleave through Redis's FIFO queue); afterwards the
    key, its queue and its liveness hash are gone from Redis and every client holds no state
    for it."""
    redis_server.flush()
    history = History()
    rounds = scaled(1)
    raw = redis.Redis.from_url(redis_server.url)
    for _ in range(rounds):
        clients = [KeyedLock(RedisBackend.from_url(redis_server.url)) for _ in range(5)]
        hold = KeyedLock(RedisBackend.from_url(redis_server.url))
        served, timed_out = await _crowd(clients, "crowd", 500, history, hold)
        for n, order in served.items():
            assert order == [i for i in range(n, 500, 5) if i % 10 != 5]  # FIFO per client
        assert sorted(timed_out) == [i for i in range(500) if i % 10 == 5]
        backend: RedisBackend = clients[0].backend  # type: ignore[assignment]
        lock, _fence, queue, alive, unreleased = backend.layout.lock("crowd")
        assert raw.exists(lock, queue, alive, unreleased) == 0
        for locks in (*clients, hold):
            b: RedisBackend = locks.backend  # type: ignore[assignment]
            assert (len(b._tier.local), b._tier.held, b._waiting.waiters) == (0, {}, {})
            await locks.close()
    raw.close()
    verdict = history.check(slack=SLACK)
    chaos_report.record(
        "Crowds on one key",
        "redis, 500 asyncio waiters on 5 clients",
        verdict,
        trials=rounds,
        notes="FIFO per client; key, queue and liveness hash gone after",
    )
    assert verdict.ok, verdict
    assert verdict.timed_out == 50 * rounds
    assert verdict.waits["granted"] == 450 * rounds


async def test_five_hundred_waiters_on_one_key_on_postgres(
    postgres_server: PgServer, chaos_report: Report
) -> None:
    """The Redis crowd on Postgres: 500 asyncio waiters over five backends queue on one key
    held by a sixth; every tenth gives up after 0.2 s, on time; the rest are all served, each
    backend's in its own arrival order (their turns interleave through the queue table);
    afterwards the line holds nobody (the key's row stays, free, with its last token) and no
    backend holds state for the key."""
    postgres_server.flush()
    history = History()
    rounds = scaled(1)
    for _ in range(rounds):
        clients = [KeyedLock(PostgresBackend.from_url(postgres_server.url)) for _ in range(5)]
        hold = KeyedLock(PostgresBackend.from_url(postgres_server.url))
        served, timed_out = await _crowd(clients, "crowd", 500, history, hold)
        for n, order in served.items():
            assert order == [i for i in range(n, 500, 5) if i % 10 != 5]  # FIFO per client
        assert sorted(timed_out) == [i for i in range(500) if i % 10 == 5]
        assert postgres_server.execute("SELECT count(*) FROM keylock_leases_queue") == [(0,)]
        assert postgres_server.execute("SELECT owner FROM keylock_leases") == [(None,)]
        for locks in (*clients, hold):
            b: PostgresBackend = locks.backend  # type: ignore[assignment]
            assert (len(b._tier.local), b._tier.held, b._waiting._flows) == (0, {}, {})
            await locks.close()
    verdict = history.check(slack=SLACK)
    chaos_report.record(
        "Crowds on one key",
        "postgres, 500 asyncio waiters on 5 backends",
        verdict,
        trials=rounds,
        notes="FIFO per backend; the line empty and the key free after",
    )
    assert verdict.ok, verdict
    assert verdict.timed_out == 50 * rounds
    assert verdict.waits["granted"] == 450 * rounds


class _NewestFirst(MemoryBackend):
    """Planted bug: a release hands the key to the newest waiter, not the oldest."""

    def _hand_off(self, key: str, entry: list[object], **how: bool) -> bool:
        waiters = entry[_WAITERS]
        if waiters:
            waiters.move_to_end(next(reversed(waiters)), last=False)  # type: ignore[call-overload,attr-defined]
        return super()._hand_off(key, entry, **how)  # type: ignore[arg-type]


async def test_crowd_order_catches_a_hand_off_to_the_newest_waiter() -> None:
    """Control: the FIFO check above fails on a backend that serves the newest waiter first."""
    locks = KeyedLock(_NewestFirst())
    served, _ = await _crowd([locks], "crowd", 1_000, History(), locks)
    assert served[0] != [i for i in range(1_000) if i % 10 != 5]
