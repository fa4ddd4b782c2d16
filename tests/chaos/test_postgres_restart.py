"""The Postgres server restarted while leases are held and waiters wait in line: ``fast``
(every session ended) and ``immediate`` (a crash, the WAL replayed at start). A restart keeps
every committed row (leases, tokens, the line): holders keep their leases through it or are
told they lost them, waiters are served after the release or fail clearly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import pytest

from keylock import BackendUnavailable, KeyedLock, Lease, LeaseLost, LockTimeout
from keylock.backends import PostgresBackend

from .._pg_server import PgServer, running_postgres
from ._history import FencedStore, Grant, History, Wait, believed_expiry
from ._report import Report, scaled


@dataclass
class _Tally:
    kept: int = 0
    lost: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


TTL = 1.0
TIMEOUT = 6.0
KEYS = ("k0", "k1")


def _waiting(watcher: KeyedLock, key: str) -> int:
    with contextlib.suppress(BackendUnavailable):
        return watcher.statistics(key).waiting
    return 0


async def _restart_trial(
    own: PgServer,
    mode: str,
    durable: bool,
    store: FencedStore,
    history: History,
    tally: _Tally,
    trial: int,
) -> None:
    """Holders on every key, three waiters per key queued (two async on one backend, one sync
    thread on another), then a restart; the holders release after it."""
    lost: list[Lease] = []
    opened = {"ttl": TTL, "durable": durable}
    holders = KeyedLock(PostgresBackend.from_url(own.url, **opened), on_lost=lost.append)
    async_waiters = KeyedLock(PostgresBackend.from_url(own.url, **opened))
    sync_waiters = KeyedLock(PostgresBackend.from_url(own.url, **opened))
    watcher = KeyedLock(PostgresBackend.from_url(own.url))
    held: dict[str, tuple[Lease, Grant]] = {}
    for key in KEYS:
        lease = await holders.acquire(key, timeout=5)
        holder = f"holder:{key}#{trial}"
        assert store.write(key, lease.token, holder, "before", time.monotonic())
        held[key] = lease, history.granted(Grant(key, lease.token, holder, time.monotonic(), None))

    def record(key: str, name: str, asked: float, outcome: str) -> None:
        kind = {"LockTimeout": "timeout", "BackendUnavailable": "error"}.get(outcome, outcome)
        history.waited(Wait(key, name, asked, time.monotonic(), TIMEOUT, kind))
        tally.count(outcome)

    async def wait_async(key: str, name: str) -> None:
        asked = time.monotonic()
        try:
            lease = await async_waiters.acquire(key, timeout=TIMEOUT)
        except (LockTimeout, BackendUnavailable) as exc:
            record(key, name, asked, type(exc).__name__)
            return
        record(key, name, asked, "granted")
        assert store.write(key, lease.token, name, "after", time.monotonic())
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
        assert store.write(key, lease.token, name, "after", time.monotonic())
        grant = history.granted(
            Grant(key, lease.token, name, time.monotonic(), None, asked_at=asked)
        )
        time.sleep(0.05)  # the section
        grant.expires_at = believed_expiry(lease)
        grant.released_at = time.monotonic()
        lease.release_sync()

    tasks = []
    for key in KEYS:
        tasks += [
            asyncio.create_task(wait_async(key, f"async-{n}:{key}#{trial}")) for n in range(2)
        ]
        tasks.append(asyncio.create_task(asyncio.to_thread(wait_sync, key, f"sync:{key}#{trial}")))
    for key in KEYS:  # one async waiter per backend reaches the server; the other queues here
        while await asyncio.to_thread(_waiting, watcher, key) < 2:
            await asyncio.sleep(0.005)
    try:
        await asyncio.to_thread(own.restart, mode)
        for key, (lease, grant) in held.items():
            await _keep_through_restart(key, lease, grant, store, tally)
    finally:  # on a failure too: no waiter left running past the test
        await asyncio.gather(*tasks, return_exceptions=True)
        tally.kept += len(held) - len(lost)
        tally.lost += len(lost)
        for locks in (holders, async_waiters, sync_waiters, watcher):
            await locks.close()


async def _keep_through_restart(
    key: str, lease: Lease, grant: Grant, store: FencedStore, tally: _Tally
) -> None:
    """The holder after the restart: its renewal reconnects (the lease runs on) or fails past
    the lease's expiry (the lease is reported lost: the pool's reconnection backoff can outlast
    a short TTL); it writes, then releases. A release whose pooled session died in the restart
    is sent again on a new connection (its release mark makes the repeat's answer true)."""
    renewed = lease.expires_at
    assert renewed is not None
    deadline = time.monotonic() + 3 * TTL + 6.0  # a renewal may wait for the pool
    while lease.expires_at <= renewed and not lease.lost:  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{key}: neither renewed nor lost"
        await asyncio.sleep(0.01)
    store.write(key, lease.token, grant.holder, "through", time.monotonic())
    grant.expires_at = believed_expiry(lease)
    grant.released_at = time.monotonic()
    try:
        await lease.release()
    except LeaseLost:
        assert lease.lost
    except BackendUnavailable:
        tally.count("holder's release BackendUnavailable")


@pytest.mark.parametrize(
    ("mode", "durable"), [("fast", False), ("immediate", True), ("immediate", False)]
)
async def test_restart_with_leases_held_and_waiters_waiting(
    mode: str, durable: bool, chaos_report: Report
) -> None:
    """Two keys, each held by one holder (auto-renewed) with three waiters queued; then the
    server restarts: ``fast`` ends every session, ``immediate`` crashes it (WAL replay at
    start). With ``durable=True``, or a clean restart, every lease and place in line was
    committed before it was reported, so it survives: each holder's renewal reconnects and its
    lease is kept, or (when psycopg_pool's reconnection backoff, 1 s or more, outlasts the 1 s
    TTL) is reported lost before anyone else is granted the key, and a late write of its is
    refused; after the release (or the
    TTL) every waiter gets the key in turn, or a clear keylock error, within its timeout plus
    a reconnection; tokens keep rising; no overlap.

    With the default ``durable=False``, a crash may forget the grants of its last moments
    (documented): two holders may then overlap until the forgotten one's next renewal, and
    the row shows it; its fenced writes are still refused, tokens still rise, nothing hangs."""
    history = History()
    store = FencedStore(history)
    trials = scaled(1)
    tally = _Tally()
    with running_postgres() as own:
        for trial in range(trials):
            await _restart_trial(own, mode, durable, store, history, tally, trial)
    verdict = history.check(slack=1.5)
    chaos_report.record(
        "Postgres restarted (leases held, waiters waiting)",
        f"postgres, {mode} restart, durable={durable}, {len(KEYS)} keys x (1 holder + 3 waiters)",
        verdict,
        trials=trials,
        notes=f"{tally.kept} leases kept through the restart, {tally.lost} lost; waiters: "
        + ", ".join(f"{n} {k}" for k, n in sorted(tally.outcomes.items())),
    )
    if mode == "immediate" and not durable:  # the documented window: fencing still holds
        assert not verdict.stale_writes_accepted, verdict
        assert not verdict.token_regressions, verdict
        assert not verdict.hangs, verdict
    else:
        assert verdict.ok, verdict
    assert tally.kept + tally.lost == len(KEYS) * trials
    assert tally.outcomes.get("granted", 0) >= 1
