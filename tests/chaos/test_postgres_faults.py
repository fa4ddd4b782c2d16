"""The server ends a client's sessions (``pg_terminate_backend``) while its leases are renewed,
taken and released (the server restarting is in ``test_postgres_restart.py``).

A killer thread ends, every few milliseconds, one session (at random) of the chosen
application names. A lease is then renewed or released as asked, or reported lost
(``on_lost``, ``LeaseLost``), or its release fails clearly (``BackendUnavailable``) and the key
frees itself at the TTL: no key stays stuck, no two holders overlap (the history checker), no
phantom grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest

from keylock import BackendUnavailable, KeyedLock, Lease, LeaseLost, LockTimeout
from keylock.backends import PostgresBackend

from .._pg_server import PgServer
from ._history import FencedStore, Grant, History, Wait, believed_expiry
from ._report import Report, scaled

TTL = 0.6


@pytest.fixture
def server(postgres_server: PgServer) -> PgServer:
    postgres_server.flush()
    return postgres_server


class Killer:
    """A thread ending, every 1 ms to *every* seconds, one session (at random) whose
    application name starts with *prefix*."""

    def __init__(self, url: str, prefix: str, *, every: float, seed: int) -> None:
        self._conn = psycopg.connect(url, autocommit=True)
        self._prefix = prefix
        self._every = every
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self.kills = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._rng.uniform(0.001, self._every)):
            rows = self._conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE starts_with(application_name, %s)",
                (self._prefix,),
            ).fetchall()
            if rows:
                (pid,) = self._rng.choice(rows)
                row = self._conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
                self.kills += bool(row and row[0])

    @contextlib.contextmanager
    def running(self) -> Iterator[Killer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)
            self._conn.close()


@dataclass
class _Tally:
    kept: int = 0
    lost: int = 0
    kills: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    phantoms: list[str] = field(default_factory=list)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


async def _acquire(locks: KeyedLock, key: str) -> Lease:
    """Acquire *key*, again after a clear BackendUnavailable (a kill can land on every retry
    of one call); bounded."""
    for _ in range(20):
        with contextlib.suppress(BackendUnavailable):
            return await locks.acquire(key, timeout=5)
    return await locks.acquire(key, timeout=5)


async def _renewal_trial(
    url: str, store: FencedStore, history: History, tally: _Tally, *, every: float, trial: int
) -> None:
    """Three holders keep a key each for 4 TTLs (renewed every TTL/3) while their sessions are
    ended at random; a contender tries each key every 10 ms."""
    lost_calls: list[Lease] = []
    holders = [
        KeyedLock(
            PostgresBackend.from_url(url, ttl=TTL, application_name=f"pgkill-holder-{i}"),
            namespace="kill",
            on_lost=lost_calls.append,
        )
        for i in range(3)
    ]
    contender = KeyedLock(PostgresBackend.from_url(url, ttl=TTL), namespace="kill")
    done = asyncio.Event()
    leases: dict[int, Lease] = {}

    async def hold(i: int) -> None:
        key = f"k{i}"
        lease = leases[i] = await _acquire(holders[i], key)
        holder = f"holder{i}#{trial}"
        assert store.write(key, lease.token, holder, "claim", time.monotonic())
        grant = history.granted(Grant(key, lease.token, holder, time.monotonic(), None))
        until = time.monotonic() + 4 * TTL
        while time.monotonic() < until:  # the section: writes, through the renewals
            store.write(key, lease.token, holder, "work", time.monotonic())
            await asyncio.sleep(0.05)
        grant.expires_at = believed_expiry(lease)
        grant.released_at = time.monotonic()
        try:
            await lease.release()
            tally.kept += 1
            assert lease not in lost_calls
        except LeaseLost:
            tally.lost += 1
        except BackendUnavailable:  # the release's own session was ended: frees at its TTL
            tally.count("release BackendUnavailable")

    async def contend(i: int) -> None:
        key = f"k{i}"
        while not done.is_set():
            try:
                got = await contender.acquire(key, timeout=0)
            except LockTimeout:
                await asyncio.sleep(0.01)
                continue
            claimed = store.write(key, got.token, "contender", "claim", time.monotonic())
            holder = leases.get(i)
            if holder is not None and not (holder.released or holder.lost):
                tally.phantoms.append(f"{key}: {got.token} granted, {holder.token} believed")
            grant = history.granted(
                Grant(key, got.token, f"contender#{trial}", time.monotonic(), None)
            )
            assert claimed
            await asyncio.sleep(0.01)
            grant.released_at = time.monotonic()
            await got.release()

    killer = Killer(url, "pgkill-holder-", every=every, seed=trial * 31 + int(every * 1000))
    with killer.running():
        contenders = [asyncio.create_task(contend(i)) for i in range(3)]
        await asyncio.gather(*(hold(i) for i in range(3)))
        done.set()
        await asyncio.gather(*contenders)
    tally.kills += killer.kills
    for i in range(3):  # nothing stuck: each key is free at once, or within a TTL
        asked = time.monotonic()
        again = await contender.acquire(f"k{i}", timeout=TTL + 1)
        history.waited(Wait(f"k{i}", "after", asked, time.monotonic(), TTL + 1, "granted"))
        await again.release()
    for locks in (*holders, contender):
        await locks.close()


@pytest.mark.parametrize("every", [0.03, 0.3], ids=["kills-every-1-30ms", "kills-every-1-300ms"])
async def test_pg_terminate_backend_mid_renewal(
    server: PgServer, chaos_report: Report, every: float
) -> None:
    """Three holders keep a key each for 4 TTLs while the server ends their sessions at random
    (pool connections of the renewer and of the holders' calls alike); a contender tries each
    key every 10 ms. A statement whose session the server ended did not run, so it is sent
    again on a new connection: leases are kept (or, had every retry failed, reported lost
    before anyone else got the key); the contender never gets a key a holder still believes
    in; each key is free within a TTL of its release."""
    history = History()
    store = FencedStore(history)
    trials = scaled(1)
    tally = _Tally()
    for trial in range(trials):
        await _renewal_trial(server.url, store, history, tally, every=every, trial=trial)
    verdict = history.check()
    chaos_report.record(
        "pg_terminate_backend mid-renewal",
        f"postgres, holders' sessions ended every 1-{every * 1000:.0f} ms",
        verdict,
        trials=3 * trials,
        notes=f"{tally.kills} sessions ended; {tally.kept} leases kept, {tally.lost} reported "
        "lost" + "".join(f", {n} {k}" for k, n in tally.outcomes.items()),
    )
    assert tally.phantoms == []
    assert verdict.ok, verdict
    assert tally.kept + tally.lost + sum(tally.outcomes.values()) == 3 * trials
    assert tally.kills > 0


async def test_pg_terminate_backend_mid_release(server: PgServer, chaos_report: Report) -> None:
    """Four workers on two backends take one key in turn (acquire, fenced write, release) for
    2 s while the server ends their sessions (pools and LISTEN alike) every 50 ms on average.
    Each release ends released, or fails clearly (LeaseLost, BackendUnavailable: the key then
    frees at its TTL); no overlap, no stale write accepted, no waiter past its timeout, and
    no key stuck: the longest gap from a holder's end to the next grant stays under a TTL plus
    a cut-off waiter's stay in line."""
    history = History()
    store = FencedStore(history)
    rng = random.Random(13)
    duration = 2.0 * scaled(1)
    outcomes = {"released": 0, "LeaseLost": 0, "BackendUnavailable": 0}
    poll = 0.2
    clients = [
        KeyedLock(
            PostgresBackend.from_url(
                server.url, ttl=TTL, poll=poll, application_name=f"pgkill-rel-{name}"
            ),
            namespace="kill",
        )
        for name in "ab"
    ]
    stop = time.monotonic() + duration

    async def worker(n: int) -> None:
        locks = clients[n % 2]
        i = 0
        while time.monotonic() < stop:
            i += 1
            asked = time.monotonic()
            try:
                lease = await locks.acquire("res", timeout=2.0)
            except (BackendUnavailable, LockTimeout) as exc:
                outcome = "error" if isinstance(exc, BackendUnavailable) else "timeout"
                history.waited(Wait("res", f"w{n}", asked, time.monotonic(), 2.0, outcome))
                continue
            history.waited(Wait("res", f"w{n}", asked, time.monotonic(), 2.0, "granted"))
            holder = f"w{n}#{i}"
            assert store.write("res", lease.token, holder, "claim", time.monotonic())
            grant = history.granted(
                Grant("res", lease.token, holder, time.monotonic(), None, asked_at=asked)
            )
            await asyncio.sleep(rng.random() * 0.01)
            store.write("res", lease.token, holder, "done", time.monotonic())
            grant.expires_at = believed_expiry(lease)
            grant.released_at = time.monotonic()
            try:
                await lease.release()
                outcomes["released"] += 1
            except (LeaseLost, BackendUnavailable) as exc:
                outcomes[type(exc).__name__] += 1

    killer = Killer(server.url, "pgkill-rel-", every=0.1, seed=rng.randrange(1 << 30))
    with killer.running():
        await asyncio.gather(*(worker(n) for n in range(4)))
    asked = time.monotonic()
    lease = await _acquire(clients[0], "res")  # not stuck
    history.waited(Wait("res", "after", asked, time.monotonic(), TTL + 5, "granted"))
    await lease.release()
    for locks in clients:
        await locks.close()
    verdict = history.check()
    chaos_report.record(
        "pg_terminate_backend mid-release",
        "postgres, sessions ended every 1-100 ms",
        verdict,
        trials=killer.kills,
        notes="trials = sessions ended; releases: "
        + ", ".join(f"{n} {k}" for k, n in outcomes.items()),
    )
    assert verdict.ok, verdict
    assert verdict.grants >= 1
    assert outcomes["released"] > 0
    if verdict.max_handoff is not None:  # a TTL, a cut-off waiter's place in line, a margin
        assert verdict.max_handoff < TTL + (3 * poll + 1) + 0.5
