"""Redis restarted without persistence while leases are held and waiters wait.

The lock server loses every key (leases, fence counters, queues); the fenced store is another
server that keeps its data, as a real database would. Extends the scenario in
``tests/scenarios/test_redis_incidents.py`` (tokens rise after a restart) with holders and
waiters in flight.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import redis

from keylock import BackendUnavailable, KeyedLock, Lease, LeaseLost, LockTimeout
from keylock.backends import RedisBackend
from keylock.backends.redis._scripts import Script
from keylock.backends.redis._wire import map_errors

from .._redis_server import Server, running_server
from ._history import Grant, History, RedisFencedStore, Wait, believed_expiry
from ._report import Report, scaled

TTL = 1.0
TIMEOUT = 4.0
SLACK = 1.5  # one reconnection and one round trip past the deadline, at most
KEYS = ("k0", "k1")


async def _queued(url: str, backend: RedisBackend, key: str, waiting: int) -> None:
    """Until *waiting* callers are in *key*'s queue on Redis (no event tells: poll the zset)."""
    raw = redis.asyncio.Redis.from_url(url)
    deadline = time.monotonic() + 60
    try:
        while await raw.zcard(backend.layout.lock(key)[2]) < waiting:
            assert time.monotonic() < deadline, f"{waiting} callers never queued for {key!r}"
            await asyncio.sleep(0.005)
    finally:
        await raw.aclose()


@dataclass
class _Tally:
    outcomes: dict[str, int] = field(default_factory=dict)
    voided: int = 0
    lost_after: list[float] = field(default_factory=list)  # restart -> on_lost, per lease


async def _restart_trial(
    own: Server, store: RedisFencedStore, history: History, tally: _Tally, trial: int
) -> None:
    """Holders on every key, three waiters per key queued, then a restart without data."""
    lost_at: dict[str, float] = {}
    lost_event = threading.Event()

    def on_lost(lease: Lease) -> None:
        lost_at[lease.key] = time.monotonic()
        if len(lost_at) == len(KEYS):
            lost_event.set()

    holders = KeyedLock(RedisBackend.from_url(own.url, ttl=TTL), on_lost=on_lost)
    async_waiters = KeyedLock(RedisBackend.from_url(own.url, ttl=TTL))
    sync_waiters = KeyedLock(RedisBackend.from_url(own.url, ttl=TTL))
    held: dict[str, tuple[Lease, Grant]] = {}
    for key in KEYS:
        asked = time.monotonic()
        lease = await holders.acquire(key, timeout=5)
        assert await store.write(key, lease.token, f"holder#{trial}", "before")
        grant = Grant(
            key, lease.token, f"holder:{key}#{trial}", time.monotonic(), None, asked_at=asked
        )
        held[key] = lease, history.granted(grant)
    claimed = {key: asyncio.Event() for key in KEYS}
    loop = asyncio.get_running_loop()

    def record(key: str, name: str, asked: float, outcome: str) -> None:
        kind = {"LockTimeout": "timeout", "BackendUnavailable": "error"}.get(outcome, outcome)
        history.waited(Wait(key, name, asked, time.monotonic(), TIMEOUT, kind))
        tally.outcomes[outcome] = tally.outcomes.get(outcome, 0) + 1

    async def wait_async(key: str, name: str) -> None:
        asked = time.monotonic()
        try:
            lease = await async_waiters.acquire(key, timeout=TIMEOUT)
        except (LockTimeout, BackendUnavailable) as exc:
            record(key, name, asked, type(exc).__name__)
            return
        record(key, name, asked, "granted")
        assert await store.write(key, lease.token, name, "after")
        claimed[key].set()
        grant = history.granted(
            Grant(key, lease.token, name, time.monotonic(), None, asked_at=asked)
        )
        await asyncio.sleep(0.05)
        grant.expires_at = believed_expiry(lease)
        grant.released_at = time.monotonic()
        await lease.release()

    def wait_sync(key: str, name: str) -> None:
        asked = time.monotonic()
        try:
            lease = sync_waiters.acquire_sync(key, timeout=TIMEOUT)
        except (LockTimeout, BackendUnavailable) as exc:
            record(key, name, asked, type(exc).__name__)
            return
        record(key, name, asked, "granted")
        assert store.write_sync(key, lease.token, name, "after")
        loop.call_soon_threadsafe(claimed[key].set)
        grant = history.granted(
            Grant(key, lease.token, name, time.monotonic(), None, asked_at=asked)
        )
        time.sleep(0.05)
        grant.expires_at = believed_expiry(lease)
        grant.released_at = time.monotonic()
        lease.release_sync()

    tasks = []
    for key in KEYS:
        tasks += [
            asyncio.create_task(wait_async(key, f"async-{n}:{key}#{trial}")) for n in range(2)
        ]
        tasks.append(asyncio.create_task(asyncio.to_thread(wait_sync, key, f"sync:{key}#{trial}")))
    for key in KEYS:  # one async waiter per client reaches Redis; the other queues in-process
        await _queued(own.url, holders.backend, key, 2)  # type: ignore[arg-type]
    restarted_at = time.monotonic()
    own.restart()  # every key gone: leases, fence counters, queues
    for _lease, grant in held.values():
        grant.voided_at = restarted_at
        tally.voided += 1
    await asyncio.gather(*tasks)
    assert await asyncio.to_thread(lost_event.wait, TTL + 5), "a holder never learned"
    for key, (lease, grant) in held.items():
        tally.lost_after.append(lost_at[key] - restarted_at)
        if claimed[key].is_set():  # a waiter wrote with a newer token: fenced off
            assert not await store.write(key, lease.token, grant.holder, "stale")
        grant.expires_at = believed_expiry(lease)
        grant.released_at = time.monotonic()
        with pytest.raises((LeaseLost, BackendUnavailable)):
            await lease.release()
        assert lease.lost
    for locks in (holders, async_waiters, sync_waiters):
        await locks.close()


async def test_restart_without_data_with_leases_held_and_waiters_waiting(
    redis_server: Server, chaos_report: Report
) -> None:
    """Two keys, each held by one holder (auto-renewed) with three waiters queued (two async
    on one client, one sync thread on another); then the lock server restarts empty.

    - no token goes backwards: every grant after the restart is above every grant before it
      (the server clock in µs, not the lost counter);
    - each holder learns within a TTL or so that its lease is gone (``on_lost`` runs once,
      release raises LeaseLost), and its write after a waiter's is rejected by the fence;
    - every waiter gets a lease or a clear keylock error (BackendUnavailable, LockTimeout),
      within its timeout plus a reconnection;
    - the checker finds no overlap except with a lease the restart voided whose later writes
      were all rejected.

    A backend minting tokens from the lost counter would restart them at 1: a token
    regression, and the stale holder's write would be accepted."""
    redis_server.flush()
    history = History()
    store = RedisFencedStore(history, redis_server.url)  # survives: the lock server does not
    trials = scaled(2)
    tally = _Tally()
    with running_server() as own:
        for trial in range(trials):
            await _restart_trial(own, store, history, tally, trial)
    await store.aclose()
    verdict = history.check(slack=SLACK)
    chaos_report.record(
        "Redis restarted without persistence (leases held, waiters waiting)",
        f"redis, {len(KEYS)} keys x (1 holder + 3 waiters)",
        verdict,
        trials=trials,
        notes=f"{tally.voided} leases voided, all reported lost (at most "
        f"{max(tally.lost_after):.2f} s after) and fenced; waiters: "
        + ", ".join(f"{n} {k}" for k, n in sorted(tally.outcomes.items())),
    )
    assert verdict.ok, verdict
    assert tally.outcomes.get("granted", 0) >= 1
    assert max(tally.lost_after) < TTL + 2


class _CounterTokens(RedisBackend):
    """Planted bug: tokens from the fence counter alone (``last + 1``), which a restart
    without persistence resets; the real scripts take ``max(last + 1, server clock in µs)``."""

    async def _run_async(
        self,
        script: Script,
        key: str,
        keys: Sequence[str],
        args: Sequence[object],
        bound: float | None = None,
    ) -> object:
        text = script.text.replace("math.max(last + 1, clock)", "last + 1")
        with map_errors(key, self._where):
            return await self._async().eval(text, len(keys), *keys, *args)  # type: ignore[arg-type]


async def test_checker_catches_tokens_that_restart_with_the_server(
    redis_server: Server,
) -> None:
    """Control for the test above: a backend whose tokens come from the counter alone hands
    out token 1 again after the restart, while the holder from before still has its lease in
    mind; the checker reports the regression, and the fence lets the stale holder write."""
    redis_server.flush()
    history = History()
    store = RedisFencedStore(history, redis_server.url)
    with running_server() as own:
        holder = KeyedLock(_CounterTokens.from_url(own.url, ttl=TTL))
        lease = await holder.acquire("k", timeout=5)
        assert await store.write("k", lease.token, "holder", "before")
        history.granted(Grant("k", lease.token, "holder", time.monotonic(), None))
        own.restart()
        waiter = KeyedLock(_CounterTokens.from_url(own.url, ttl=TTL))
        taken = await waiter.acquire("k", timeout=5)
        assert await store.write("k", taken.token, "waiter", "after")
        history.granted(Grant("k", taken.token, "waiter", time.monotonic(), None))
        stale_accepted = await store.write("k", lease.token, "holder", "stale")
        await taken.release()
        for locks in (holder, waiter):
            await locks.close()
    await store.aclose()
    assert taken.token <= lease.token
    assert history.check().token_regressions
    assert stale_accepted  # the fence cannot tell: the new holder's token is no higher
