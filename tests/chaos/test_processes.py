"""Holders killed (SIGKILL) or frozen past their TTL (SIGSTOP) mid-section, in separate
processes on the file, Redis and Postgres backends; in memory, holder tasks killed by cancellation.

Worker processes cycle on one key: acquire, fenced write (the claim), work, fenced write,
release; each event goes to the parent, which builds the history and, at random instants in
random sections, kills or freezes the holder. The history checker judges the whole run: the
next holder never overlaps a live one; a dead holder's lease ends with it (the OS frees a file
lock; a Redis or Postgres lease runs out at its TTL); a frozen holder that wakes after a
takeover has its write rejected by the fence; every waiter is served or times out on time.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import redis

from keylock import BackendUnavailable, KeyedLock, LeaseLost, LockTimeout, StaleToken
from keylock.backends import Backend, FileBackend, PostgresBackend, RedisBackend
from keylock.fencing import fenced_set_sync

from .._pg_server import PgServer
from .._redis_server import Server
from ._events import Events
from ._history import Grant, History, Wait, Write, believed_expiry
from ._report import Report, scaled

# forkserver: children forked from a clean single-threaded server, not from this process and
# its Redis listener threads (a fork can copy a lock another thread holds)
ctx = multiprocessing.get_context("forkserver")
TTL = 0.5
HOLD = 0.3  # each section
TIMEOUT = 5.0


def _backend(kind: str, where: str) -> Backend:
    if kind == "file":
        return FileBackend(where)
    if kind == "postgres":
        return PostgresBackend.from_url(where, ttl=TTL)
    return RedisBackend.from_url(where, ttl=TTL)


def _worker(
    kind: str, where: str, store_url: str, name: str, ttl: float | None, events: Events
) -> None:
    """Cycle on the key until killed or told to stop (by a full section count), reporting
    each event before the next step (see Events: read in the order they happened)."""
    put = events.send
    locks = KeyedLock(_backend(kind, where))
    store = redis.Redis.from_url(store_url)

    def write(holder: str, token: int, value: str) -> None:
        at = time.monotonic()
        try:
            fenced_set_sync(store, "res", token, value)
            put(("write", holder, token, at, True))
        except StaleToken:
            put(("write", holder, token, at, False))

    for i in range(1_000_000):
        holder = f"{name}#{i}"
        asked = time.monotonic()
        try:
            lease = locks.acquire_sync("res", timeout=TIMEOUT, ttl=ttl)
        except (LockTimeout, BackendUnavailable) as exc:
            outcome = "timeout" if isinstance(exc, LockTimeout) else "error"
            put(("wait", holder, asked, time.monotonic(), outcome))
            continue
        put(("wait", holder, asked, time.monotonic(), "granted"))
        write(holder, lease.token, "claim")
        put(("grant", holder, lease.token, time.monotonic(), believed_expiry(lease), asked))
        time.sleep(HOLD)  # the section: the parent may SIGKILL or SIGSTOP us here
        write(holder, lease.token, "done")
        put(("release", holder, time.monotonic(), believed_expiry(lease)))
        try:
            lease.release_sync()
            put(("released", holder, "released"))
        except LeaseLost:
            put(("released", holder, "LeaseLost"))


class _Run:
    """The parent's side: workers, their events, the history."""

    def __init__(self, kind: str, where: str, store_url: str, ttl: float | None) -> None:
        self.kind, self.where, self.store_url, self.ttl = kind, where, store_url, ttl
        self.events = Events(ctx)  # (a Queue could deliver a grant before the release before it)
        self.history = History()
        self.grants: dict[str, Grant] = {}
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self.outcomes: dict[str, int] = {}
        self.dead: dict[str, float] = {}  # process name -> when it was killed
        self._names = 0

    def spawn(self) -> None:
        name = f"p{self._names}"
        self._names += 1
        proc = ctx.Process(
            target=_worker,
            args=(self.kind, self.where, self.store_url, name, self.ttl, self.events),
            daemon=True,
        )
        proc.start()
        self.procs[name] = proc

    def next_grant(self) -> Grant:
        """Read events until the next grant; returns it."""
        while True:
            grant = self._read(self.events.get(timeout=30))
            if grant is not None:
                return grant

    def drain(self) -> None:
        """Read on until every grant read so far has its release (each process's events
        reach the parent through its own feeder thread, so the last grant read can overtake
        the release before it: that lease would be judged live for ever). Grants read now
        are left out: they are past the run's end."""
        deadline = time.monotonic() + 30
        while self._open() and time.monotonic() < deadline:
            self._read(self.events.get(timeout=30), record=False)

    def _open(self) -> bool:
        return any(g.released_at is None and g.voided_at is None for g in self.grants.values())

    def _read(self, event: tuple[object, ...], *, record: bool = True) -> Grant | None:
        """Record one event; the grant, if it was one (and *record*)."""
        kind, holder = event[0], str(event[1])
        if kind == "wait":
            _, _, asked, ended, outcome = event
            self.history.waited(Wait("res", holder, asked, ended, TIMEOUT, outcome))  # type: ignore[arg-type]
        elif kind == "write":
            _, _, token, at, accepted = event
            self.history.wrote(Write("res", token, holder, at, accepted))  # type: ignore[arg-type]
        elif kind == "release" and holder in self.grants:
            _, _, released_at, expires_at = event
            grant = self.grants[holder]
            grant.released_at, grant.expires_at = released_at, expires_at  # type: ignore[assignment]
        elif kind == "released":
            self.outcomes[str(event[2])] = self.outcomes.get(str(event[2]), 0) + 1
        elif kind == "grant" and record:
            _, _, token, granted_at, expires_at, asked = event
            grant = Grant("res", token, holder, granted_at, expires_at, asked_at=asked)  # type: ignore[arg-type]
            grant.voided_at = self.dead.get(holder.split("#")[0])  # told after its death
            self.grants[holder] = self.history.granted(grant)
            return grant
        return None

    def kill(self, name: str) -> None:
        """SIGKILL a worker: every lease it holds ends with it (now, or once read)."""
        proc = self.procs.pop(name)
        self.dead[name] = time.monotonic()  # before the kill: it can act no later than this
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(10)
        for holder, grant in self.grants.items():
            if holder.split("#")[0] == name and grant.released_at is None:
                grant.voided_at = self.dead[name]

    def process_of(self, grant: Grant) -> multiprocessing.process.BaseProcess | None:
        """The live worker that holds *grant*, if it still runs."""
        return self.procs.get(grant.holder.split("#")[0])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
            proc.join(10)


def _where(kind: str, tmp_path: Path, server: Server, request: pytest.FixtureRequest) -> str:
    """Where the workers' locks live (the fenced store is the Redis server, for every kind)."""
    if kind == "file":
        return str(tmp_path / "locks")
    if kind == "postgres":
        postgres: PgServer = request.getfixturevalue("postgres_server")
        postgres.flush()
        return postgres.url
    return server.url


KINDS = ["file", "redis", "postgres"]
_LEASE_ENDS = {
    "file": "the OS frees the lock at death",
    "redis": "the lease runs out",
    "postgres": "the lease row runs out",
}


@pytest.mark.parametrize("kind", KINDS)
def test_holders_sigkilled_mid_section(
    kind: str,
    tmp_path: Path,
    redis_server: Server,
    chaos_report: Report,
    request: pytest.FixtureRequest,
) -> None:
    """Three processes contend; now and then the holder is SIGKILLed in the middle of its
    section (and replaced). Its lease ends with it: at once on files (the OS frees the lock),
    at its TTL on Redis and Postgres (no release ever comes); the next waiter gets the key,
    with a higher token, well within its timeout; no overlap with any live lease. A lock whose lease
    outlived its dead holder (no TTL, no OS release) would leave every waiter to time out:
    hangs in the report."""
    redis_server.flush()
    rng = random.Random(3)
    run = _Run(kind, _where(kind, tmp_path, redis_server, request), redis_server.url, None)
    kills = scaled(4)
    for _ in range(3):
        run.spawn()
    try:
        done = 0
        while done < kills:
            grant = run.next_grant()
            if rng.random() < 0.5 or time.monotonic() - grant.granted_at > HOLD / 3:
                continue  # not this one, or read too late to be sure it is still held
            time.sleep(rng.uniform(0, HOLD / 2))  # a random instant of the section
            if run.process_of(grant) is None:  # a grant read after its holder was killed
                continue
            run.kill(grant.holder.split("#")[0])
            run.spawn()
            done += 1
        for _ in range(6):  # the key keeps moving after the last kill
            run.next_grant()
        run.drain()
    finally:
        run.stop()
    verdict = run.history.check()
    chaos_report.record(
        "Holder killed mid-section",
        f"{kind}, 3 processes, SIGKILL",
        verdict,
        trials=kills,
        notes=_LEASE_ENDS[kind],
    )
    assert verdict.ok, verdict
    assert verdict.timed_out == 0
    assert verdict.max_handoff is not None
    # file leases have no TTL here: any hand-off at all proves the OS freed the dead holder's
    # lock (how fast is a benchmark figure); the bound only catches a hang
    assert verdict.max_handoff < (TIMEOUT if kind == "file" else TTL + 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_holders_sigstopped_past_their_ttl(
    kind: str,
    tmp_path: Path,
    redis_server: Server,
    chaos_report: Report,
    request: pytest.FixtureRequest,
) -> None:
    """Three processes contend with TTL leases; now and then the holder is frozen (SIGSTOP)
    for twice its TTL mid-section, then resumed. On Redis and Postgres another process takes
    over once the TTL runs out, with a higher token, and the frozen holder's write on waking is
    rejected by the fence and its release raises LeaseLost. On files the OS lock stays with the
    frozen process (another process cannot break it, by design): the others wait, and the
    woken holder finds its lease expired (LeaseLost) but no one else's grant. No overlap either way;
    every waiter served or timed out on time. Without the fence the woken holder's write
    would land after the new holder's (a stale write accepted); a holder that trusted its
    old lease on waking instead of checking would show as an overlap."""
    redis_server.flush()
    rng = random.Random(4)
    ttl = TTL if kind == "file" else None  # Redis, Postgres: the backend's TTL, auto-renewed
    run = _Run(kind, _where(kind, tmp_path, redis_server, request), redis_server.url, ttl)
    pauses = scaled(3)
    for _ in range(3):
        run.spawn()
    try:
        done = 0
        while done < pauses:
            grant = run.next_grant()
            if rng.random() < 0.5 or time.monotonic() - grant.granted_at > HOLD / 3:
                continue  # not this one, or read too late to be sure it is still held
            time.sleep(rng.uniform(0, HOLD / 2))  # a random instant of the section
            proc = run.process_of(grant)
            assert proc is not None
            os.kill(proc.pid, signal.SIGSTOP)  # type: ignore[arg-type]
            time.sleep(2 * TTL)  # the pause itself (a GC pause, a frozen VM)
            os.kill(proc.pid, signal.SIGCONT)  # type: ignore[arg-type]
            done += 1
        for _ in range(6):
            run.next_grant()
        run.drain()
    finally:
        run.stop()
    verdict = run.history.check()
    rejected = sum(not w.accepted for w in run.history.writes)
    chaos_report.record(
        "Holder paused past its TTL (SIGSTOP), then resumed",
        f"{kind}, 3 processes, paused 2 TTLs",
        verdict,
        trials=pauses,
        notes=f"{rejected} stale writes rejected; releases: "
        + ", ".join(f"{n} {k}" for k, n in sorted(run.outcomes.items())),
    )
    assert verdict.ok, verdict
    # every frozen holder wakes to a lost lease; on a server someone took over and wrote first
    assert run.outcomes.get("LeaseLost", 0) >= pauses
    if kind != "file":
        assert rejected >= pauses


async def test_holder_tasks_killed_by_cancellation(chaos_report: Report) -> None:
    """In memory a holder "dies" by cancellation: tasks cycle on one key and the holder is
    cancelled at a random instant of its section; its ``async with`` gives the key on at
    once; the checker sees no overlap and no waiter waits past its timeout. A section that
    kept the key when cancelled (a lock released only on success) strands every waiter."""
    rng = random.Random(5)
    history = History()
    locks = KeyedLock()
    stop = asyncio.Event()
    holding: dict[str, asyncio.Task[None]] = {}

    async def worker(name: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            holder = f"{name}#{i}"
            asked = time.monotonic()
            async with locks("res", timeout=TIMEOUT) as lease:
                history.waited(Wait("res", holder, asked, time.monotonic(), TIMEOUT, "granted"))
                grant = history.granted(
                    Grant("res", lease.token, holder, time.monotonic(), None, asked_at=asked)
                )
                holding[name] = asyncio.current_task()  # type: ignore[assignment]
                try:
                    await asyncio.sleep(0.002)
                finally:
                    holding.pop(name, None)
                    grant.released_at = time.monotonic()

    kills = scaled(200)
    names = iter(range(1_000_000))
    tasks = {asyncio.create_task(worker(f"t{next(names)}")) for _ in range(5)}
    for _ in range(kills):
        while not holding:
            await asyncio.sleep(0)
        await asyncio.sleep(rng.random() * 0.002)
        for task in list(holding.values())[:1]:
            task.cancel()
            tasks.add(asyncio.create_task(worker(f"t{next(names)}")))
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    verdict = history.check()
    chaos_report.record(
        "Holder killed mid-section",
        "memory, holder task cancelled",
        verdict,
        trials=kills,
        notes="the cancelled section releases on the way out",
    )
    assert verdict.ok, verdict
    assert len(locks.backend) == 0  # type: ignore[arg-type]
