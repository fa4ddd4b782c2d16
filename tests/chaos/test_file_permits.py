"""FileBackend semaphores and RW locks with holders killed (SIGKILL) or frozen (SIGSTOP)
mid-section, in separate processes, judged by the history checker's permit mode: never more
than ``limit`` weight of live leases (no reader beside a writer), writer tokens above every
token before them, every waiter served or timed out on time.

A killed holder's permits end with it (the OS frees its slot files); a frozen one keeps them
(a live process's flock cannot be broken from outside): the others wait, or time out.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from keylock import KeyedLock, LeaseLost, LockTimeout
from keylock.backends import FileBackend
from keylock.backends.base import RW_LIMIT

from ._history import Grant, History, Wait, believed_expiry
from ._report import Report, scaled

ctx = multiprocessing.get_context("forkserver")  # (no thread of this process is copied)
HOLD = 0.15
TIMEOUT = 5.0
TTL = 0.3
SHAPES = {"sem2": (2, (1, 1, 1, 1, 1)), "rw": (RW_LIMIT, (1, 1, 1, RW_LIMIT, RW_LIMIT))}


def _worker(
    where: str, limit: int, weight: int, name: str, ttl: float | None, events: object
) -> None:
    put = events.put  # type: ignore[attr-defined]
    locks = KeyedLock(FileBackend(where).permits(limit, weight))
    for i in range(1_000_000):
        holder = f"{name}#{i}"
        asked = time.monotonic()
        try:
            lease = locks.acquire_sync("res", timeout=TIMEOUT, ttl=ttl)
        except LockTimeout:
            put(("wait", holder, asked, time.monotonic(), "timeout"))
            continue
        put(("wait", holder, asked, time.monotonic(), "granted"))
        put(("grant", holder, lease.token, time.monotonic(), believed_expiry(lease), asked))
        time.sleep(HOLD)  # the section: the parent may SIGKILL or SIGSTOP us here
        put(("release", holder, time.monotonic(), believed_expiry(lease)))
        try:
            lease.release_sync()
        except LeaseLost:
            put(("lost", holder))


class _Run:
    def __init__(self, where: str, shape: str, ttl: float | None) -> None:
        self.where, self.ttl = where, ttl
        self.limit, self.weights = SHAPES[shape]
        self.events: multiprocessing.Queue[tuple[object, ...]] = ctx.Queue()
        self.history = History(limit=self.limit)
        self.grants: dict[str, Grant] = {}
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self.weight_of: dict[str, int] = {}
        self.dead: dict[str, float] = {}
        self.lost = 0
        self._names = 0

    def spawn(self, weight: int) -> None:
        name = f"p{self._names}"
        self._names += 1
        args = (self.where, self.limit, weight, name, self.ttl, self.events)
        proc = ctx.Process(target=_worker, args=args, daemon=True)
        proc.start()
        self.procs[name], self.weight_of[name] = proc, weight

    def next_grant(self) -> Grant:
        while True:
            event = self.events.get(timeout=60)
            kind, holder = event[0], str(event[1])
            name = holder.split("#")[0]
            if kind == "wait":
                _, _, asked, ended, outcome = event
                self.history.waited(Wait("res", holder, asked, ended, TIMEOUT, outcome))  # type: ignore[arg-type]
            elif kind == "release":
                grant = self.grants[holder]
                grant.released_at, grant.expires_at = event[2], event[3]  # type: ignore[assignment]
            elif kind == "lost":
                self.lost += 1
            elif kind == "grant":
                _, _, token, granted_at, expires_at, asked = event
                grant = Grant(
                    "res",
                    token,
                    holder,
                    granted_at,
                    expires_at,  # type: ignore[arg-type]
                    asked_at=asked,
                    weight=self.weight_of[name],  # type: ignore[arg-type]
                )
                grant.voided_at = self.dead.get(name)
                self.grants[holder] = self.history.granted(grant)
                return grant

    def drain(self) -> None:
        """Read the releases of the grants read so far (another process's events may come in
        any order: the last grant read can overtake the release before it); later grants are
        not recorded (they are outside the run)."""
        open_ = {h for h, g in self.grants.items() if g.released_at is None and not g.voided_at}
        deadline = time.monotonic() + 30
        while open_ and time.monotonic() < deadline:
            event = self.events.get(timeout=30)
            holder = str(event[1])
            if event[0] == "release" and holder in open_:
                grant = self.grants[holder]
                grant.released_at, grant.expires_at = event[2], event[3]  # type: ignore[assignment]
                open_.discard(holder)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        self.dead[name] = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(10)
        for holder, grant in self.grants.items():
            if holder.split("#")[0] == name and grant.released_at is None:
                grant.voided_at = self.dead[name]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
            proc.join(10)


def _shown(grant: Grant) -> str:
    ends = (grant.released_at, grant.expires_at, grant.voided_at)
    return f"{grant.holder} w{grant.weight} t{grant.token} {grant.granted_at:.4f}-{ends}"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_file_permit_holders_killed_or_frozen(
    shape: str, fault: str, tmp_path: Path, chaos_report: Report
) -> None:
    """Five processes contend for a semaphore of limit 2 (or an RW lock: three readers, two
    writers); now and then a fresh holder is SIGKILLed (and replaced) or SIGSTOPped for two
    TTLs, at a random instant of its section. The checker sees no more than ``limit`` weight
    live (a killed holder's permits end at its death), no token regression, no hang."""
    rng = random.Random(12)
    run = _Run(str(tmp_path / "locks"), shape, TTL if fault == "SIGSTOP" else None)
    faults = scaled(4)
    for weight in run.weights:
        run.spawn(weight)
    try:
        done = 0
        while done < faults:
            grant = run.next_grant()
            if rng.random() < 0.5 or time.monotonic() - grant.granted_at > HOLD / 3:
                continue  # not this one, or read too late to be sure it is still held
            time.sleep(rng.uniform(0, HOLD / 2))  # a random instant of the section
            name = grant.holder.split("#")[0]
            proc = run.procs.get(name)
            if proc is None:
                continue
            if fault == "SIGKILL":
                run.kill(name)
                run.spawn(run.weight_of[name])
            else:
                os.kill(proc.pid, signal.SIGSTOP)  # type: ignore[arg-type]
                time.sleep(2 * TTL)  # the pause itself (a GC pause, a frozen VM)
                os.kill(proc.pid, signal.SIGCONT)  # type: ignore[arg-type]
            done += 1
        for _ in range(8):  # the key keeps moving after the last fault
            run.next_grant()
        run.drain()
    finally:
        run.stop()
    verdict = run.history.check()
    chaos_report.record(
        "File permit holder killed or frozen mid-section",
        f"file {shape}, 5 processes, {fault}",
        verdict,
        trials=faults,
        notes="the OS frees a dead holder's permits; a frozen one keeps them"
        + (f"; {run.lost} woke to LeaseLost" if fault == "SIGSTOP" else ""),
    )
    assert verdict.ok, (verdict, [_shown(g) for g in run.history.grants])
    assert verdict.timed_out == 0 or fault == "SIGSTOP"  # (a frozen holder may outlast one)
    if fault == "SIGSTOP":
        assert run.lost >= faults  # every frozen holder woke past its TTL: its release said so
