"""Redis permit holders killed (SIGKILL) or frozen past their TTL (SIGSTOP) mid-section, in
separate processes, for a semaphore of limit 3 and an RW lock (two writers among six).

Worker processes cycle on one key (acquire, hold, release) and report each event to the
parent, which builds the history and, at random instants of random sections, kills or freezes
a holder. The history checker in permit mode judges the run: live permits never weigh more
than the limit (more than 3 holders; a writer beside anyone), no token is reused and a
writer's is above every earlier grant, and every wait ends on time. A dead holder's permit
lapses at its TTL (else its room is gone for good and waiters time out); a frozen holder wakes
to a lost permit (its release raises LeaseLost) while the others took its room.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import signal
import time

import pytest

from keylock import BackendUnavailable, KeyedLock, LeaseLost, LockTimeout
from keylock.backends import RedisBackend
from keylock.backends.base import RW_LIMIT

from .._redis_server import Server
from ._history import Grant, History, Wait, believed_expiry
from ._report import Report, scaled

# forkserver: children forked from a clean single-threaded server, not from this process and
# its Redis listener threads (a fork can copy a lock another thread holds)
ctx = multiprocessing.get_context("forkserver")
TTL = 0.5
HOLD = 0.3
TIMEOUT = 5.0
SHAPES = {"sem3": 3, "rw": RW_LIMIT}  # shape -> limit
WORKERS = 6


def _worker(url: str, shape: str, name: str, writer: bool, events: object) -> None:
    """Cycle on the key until killed, reporting every event."""
    put = events.put  # type: ignore[attr-defined]
    limit = SHAPES[shape]
    weight = limit if writer else 1
    backend = RedisBackend.from_url(url, ttl=TTL)  # auto-renewed: only death or a pause ends it
    locks = KeyedLock(backend.permits(limit, weight))
    rng = random.Random(name)
    for i in range(1_000_000):
        holder = f"{name}#{i}"
        asked = time.monotonic()
        try:
            lease = locks.acquire_sync("res", timeout=TIMEOUT)
        except (LockTimeout, BackendUnavailable) as exc:
            outcome = "timeout" if isinstance(exc, LockTimeout) else "error"
            put(("wait", holder, asked, time.monotonic(), outcome))
            continue
        put(("wait", holder, asked, time.monotonic(), "granted"))
        put(("grant", holder, lease.token, time.monotonic(), believed_expiry(lease), asked, weight))
        time.sleep(HOLD * rng.uniform(0.9, 1.1))  # the section: the parent may kill us here
        put(("release", holder, time.monotonic(), believed_expiry(lease)))
        try:
            lease.release_sync()
            put(("released", holder, "released"))
        except LeaseLost:
            put(("released", holder, "LeaseLost"))


class _Run:
    """The parent's side: workers, their events, the history."""

    def __init__(self, url: str, shape: str) -> None:
        self.url, self.shape = url, shape
        self.events: multiprocessing.Queue[tuple[object, ...]] = ctx.Queue()
        self.history = History(limit=SHAPES[shape])
        self.grants: dict[str, Grant] = {}
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self.outcomes: dict[str, int] = {}
        self.dead: dict[str, float] = {}  # process name -> when it was killed
        self._names = 0

    def spawn(self, writer: bool) -> None:
        name = f"{'w' if writer else 'r'}{self._names}"
        self._names += 1
        proc = ctx.Process(
            target=_worker, args=(self.url, self.shape, name, writer, self.events), daemon=True
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
        the release before it: that permit would be judged live for ever, over the limit).
        Grants read now are left out: they are past the run's end."""
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
        elif kind == "release" and holder in self.grants:
            _, _, released_at, expires_at = event
            grant = self.grants[holder]
            grant.released_at, grant.expires_at = released_at, expires_at  # type: ignore[assignment]
        elif kind == "released":
            self.outcomes[str(event[2])] = self.outcomes.get(str(event[2]), 0) + 1
        elif kind == "grant" and record:
            _, _, token, granted_at, expires_at, asked, weight = event
            grant = Grant(
                "res",
                token,  # type: ignore[arg-type]
                holder,
                granted_at,  # type: ignore[arg-type]
                expires_at,  # type: ignore[arg-type]
                asked_at=asked,  # type: ignore[arg-type]
                weight=weight,  # type: ignore[arg-type]
            )
            grant.voided_at = self.dead.get(holder.split("#")[0])  # told after its death
            self.grants[holder] = self.history.granted(grant)
            return grant
        return None

    def kill(self, name: str) -> None:
        """SIGKILL a worker: its permits stop counting now (on Redis they lapse at the TTL)."""
        proc = self.procs.pop(name)
        self.dead[name] = time.monotonic()  # before the kill: it can act no later than this
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(10)
        for holder, grant in self.grants.items():
            if holder.split("#")[0] == name and grant.released_at is None:
                grant.voided_at = self.dead[name]

    def process_of(self, grant: Grant) -> multiprocessing.process.BaseProcess | None:
        return self.procs.get(grant.holder.split("#")[0])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
            proc.join(10)


def _start(redis_server: Server, shape: str) -> _Run:
    redis_server.flush()
    run = _Run(redis_server.url, shape)
    for n in range(WORKERS):
        run.spawn(writer=shape == "rw" and n % 3 == 0)
    return run


def _victim(
    run: _Run, grant: Grant, rng: random.Random
) -> multiprocessing.process.BaseProcess | None:
    """The process of *grant* at a random instant of its section (at most HOLD / 2 into a
    section of at least 0.9 HOLD), or None: not this one, or read too late to be sure."""
    if rng.random() < 0.5 or time.monotonic() - grant.granted_at > HOLD / 4:
        return None
    time.sleep(rng.uniform(0, HOLD / 4))
    return run.process_of(grant)


def test_a_release_overtaken_by_the_next_grant_is_read_before_judging() -> None:
    """Each worker's events reach the parent through its own feeder thread: r0 released
    (1.25) before r3 was granted (1.30), but r3's grant is read first. A run that stops
    reading at its last grant judges r0's permit live for ever: 4 permits of a semaphore of
    3 (what a SIGSTOP row once reported, on the last grants of its run). drain() reads the
    releases of the grants read so far. Fails before: no drain, and the verdict says over
    the limit."""
    run = _Run("redis://unused", "sem3")
    run.events.close()
    run.events = queue.Queue()  # type: ignore[assignment]
    grants = [(f"r{n}#0", 1.0 + n / 10) for n in range(3)]
    for holder, at in grants:
        run.events.put(("grant", holder, int(at * 100), at, at + 0.5, at - 0.01, 1))
    run.events.put(("grant", "r3#0", 130, 1.30, 1.80, 1.0, 1))  # (overtook r0's release)
    for holder, at in [("r0#0", 1.25), ("r1#0", 1.4), ("r2#0", 1.5), ("r3#0", 1.6)]:
        run.events.put(("release", holder, at, at + 0.4))
    for _ in range(4):
        run.next_grant()
    assert not run.history.check().ok  # judged now: r0 looks live beside r1, r2 and r3
    run.drain()
    assert run.history.check().ok, run.history.check()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_permit_holders_sigkilled_mid_section(
    shape: str, redis_server: Server, chaos_report: Report
) -> None:
    """Six processes contend; now and then a holder is SIGKILLed mid-section (and replaced).
    Its permit lapses at its TTL (no release ever comes): the waiters keep being served,
    none times out, and live permits never weigh more than the limit. A permit that outlived
    its dead holder would leave its room gone for good: after 3 kills of a semaphore of 3,
    every waiter would time out."""
    rng = random.Random(13)
    run = _start(redis_server, shape)
    kills = scaled(4)
    try:
        done = 0
        while done < kills:
            grant = run.next_grant()
            proc = _victim(run, grant, rng)
            if proc is None:
                continue
            name = grant.holder.split("#")[0]
            run.kill(name)
            run.spawn(writer=name.startswith("w"))
            done += 1
        for _ in range(12):  # the key keeps moving after the last kill
            run.next_grant()
        run.drain()
    finally:
        run.stop()
    verdict = run.history.check()
    chaos_report.record(
        "Permit holder killed mid-section",
        f"redis {shape}, {WORKERS} processes, SIGKILL",
        verdict,
        trials=kills,
        notes="the dead holder's permit lapses at its TTL",
    )
    assert verdict.ok, verdict
    assert verdict.timed_out == 0


@pytest.mark.parametrize("shape", list(SHAPES))
def test_permit_holders_sigstopped_past_their_ttl(
    shape: str, redis_server: Server, chaos_report: Report
) -> None:
    """Six processes contend with auto-renewed permits; now and then a holder is frozen
    (SIGSTOP, its renewer with it) for twice its TTL mid-section, then resumed. Its permit
    lapses at the TTL and its room goes to the others; on waking, its release raises
    LeaseLost. No more than the limit live at any grant, no writer beside anyone."""
    rng = random.Random(14)
    run = _start(redis_server, shape)
    pauses = scaled(3)
    try:
        done = 0
        while done < pauses:
            grant = run.next_grant()
            proc = _victim(run, grant, rng)
            if proc is None:
                continue
            os.kill(proc.pid, signal.SIGSTOP)  # type: ignore[arg-type]
            time.sleep(2 * TTL)  # the pause itself (a GC pause, a frozen VM)
            os.kill(proc.pid, signal.SIGCONT)  # type: ignore[arg-type]
            done += 1
        for _ in range(12):
            run.next_grant()
        run.drain()
    finally:
        run.stop()
    verdict = run.history.check()
    chaos_report.record(
        "Permit holder paused past its TTL (SIGSTOP), then resumed",
        f"redis {shape}, {WORKERS} processes, paused 2 TTLs",
        verdict,
        trials=pauses,
        notes="releases: " + ", ".join(f"{n} {k}" for k, n in sorted(run.outcomes.items())),
    )
    assert verdict.ok, verdict
    assert run.outcomes.get("LeaseLost", 0) >= pauses  # every frozen holder woke to a loss
