"""Postgres permits under faults, judged by the history checker's permit mode (never more than
``limit`` weight of live leases; a writer beside nobody; tokens rising): the server ending
sessions (``pg_terminate_backend``) of RW readers and writers mid-release, and permit holders
SIGKILLed mid-section (their permits lapse at their TTL; nobody gets in before).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import random
import signal
import time
from multiprocessing.connection import Connection, wait
from typing import cast

import pytest

from keylock import BackendUnavailable, KeyedLock, LeaseLost, LockTimeout
from keylock.backends import PostgresBackend
from keylock.backends.base import RW_LIMIT

from .._pg_server import PgServer
from ._history import Grant, History, Wait, believed_expiry
from ._report import Report, scaled
from .test_postgres_faults import Killer

TTL = 0.6
ctx = multiprocessing.get_context("forkserver")


@pytest.fixture
def server(postgres_server: PgServer) -> PgServer:
    postgres_server.flush()
    return postgres_server


async def test_pg_terminate_backend_mid_release_rw(server: PgServer, chaos_report: Report) -> None:
    """Six workers on three clients take one RW lock in turn (a third of them writers) for
    2 s while the server ends their sessions (pools and LISTEN alike) every 50 ms on average.
    Each release ends released, or fails clearly (LeaseLost, BackendUnavailable: the permit
    then lapses at its TTL); no writer beside anyone, no token regression, no waiter past its
    timeout, nothing stuck."""
    history = History(limit=RW_LIMIT)
    rng = random.Random(17)
    duration = 2.0 * scaled(1)
    outcomes = {"released": 0, "LeaseLost": 0, "BackendUnavailable": 0}
    backends = [
        PostgresBackend.from_url(
            server.url, ttl=TTL, poll=0.2, application_name=f"pgkill-rw-{name}"
        )
        for name in "abc"
    ]
    stop = time.monotonic() + duration

    async def worker(n: int) -> None:
        weight = RW_LIMIT if n % 3 == 0 else 1
        locks = KeyedLock(backends[n % 3].permits(RW_LIMIT, weight), namespace="kill")
        i = 0
        while time.monotonic() < stop:
            i += 1
            asked = time.monotonic()
            try:
                lease = await locks.acquire("doc", timeout=2.0)
            except (BackendUnavailable, LockTimeout) as exc:
                outcome = "error" if isinstance(exc, BackendUnavailable) else "timeout"
                history.waited(Wait("doc", f"w{n}", asked, time.monotonic(), 2.0, outcome))
                continue
            history.waited(Wait("doc", f"w{n}", asked, time.monotonic(), 2.0, "granted"))
            grant = history.granted(
                Grant(
                    "doc",
                    lease.token,
                    f"w{n}#{i}",
                    time.monotonic(),
                    None,
                    asked_at=asked,
                    weight=weight,
                )
            )
            await asyncio.sleep(rng.random() * 0.01)
            grant.expires_at = believed_expiry(lease)
            grant.released_at = time.monotonic()
            try:
                await lease.release()
                outcomes["released"] += 1
            except (LeaseLost, BackendUnavailable) as exc:
                outcomes[type(exc).__name__] += 1

    killer = Killer(server.url, "pgkill-rw-", every=0.1, seed=rng.randrange(1 << 30))
    with killer.running():
        await asyncio.gather(*(worker(n) for n in range(6)))
    writer = KeyedLock(backends[0].permits(RW_LIMIT, RW_LIMIT), namespace="kill")
    asked = time.monotonic()
    lease = await writer.acquire("doc", timeout=TTL + 5)  # not stuck
    history.waited(Wait("doc", "after", asked, time.monotonic(), TTL + 5, "granted"))
    await lease.release()
    for backend in backends:
        await backend.close()
    verdict = history.check()
    chaos_report.record(
        "pg_terminate_backend mid-release (RW lock)",
        "postgres, sessions ended every 1-100 ms",
        verdict,
        trials=killer.kills,
        notes="trials = sessions ended; releases: "
        + ", ".join(f"{n} {k}" for k, n in outcomes.items()),
    )
    assert verdict.ok, verdict
    assert outcomes["released"] > 0
    assert killer.kills > 0


def _hold_in_turn(url: str, index: int, events: object, stop: object) -> None:
    """Take a permit of a semaphore of limit 2 again and again (no auto-renew: each holder's
    belief is its grant's expiry), reporting each grant and release to the parent."""
    locks = KeyedLock(
        PostgresBackend.from_url(url, ttl=TTL, auto_renew=False).permits(2),
        namespace="sigkill",
    )
    rng = random.Random(index)
    out = cast("Connection", events)
    i = 0
    while not stop.is_set():  # type: ignore[attr-defined]
        i += 1
        try:
            lease = locks.acquire_sync("k", timeout=5)
        except LockTimeout:
            continue
        out.send(("g", index, i, lease.token, time.monotonic(), believed_expiry(lease)))
        time.sleep(rng.random() * 0.02)
        out.send(("r", index, i, time.monotonic()))
        with contextlib.suppress(LeaseLost):
            lease.release_sync()
    locks.backend._parent.close_sync()  # type: ignore[attr-defined]


def test_sigkill_of_permit_holders(server: PgServer, chaos_report: Report) -> None:
    """Four processes share a semaphore of limit 2; two are SIGKILLed mid-section, right after
    they reported a grant: a killed holder's permit lapses at its TTL and nobody exceeds the
    limit meanwhile; tokens rise; the survivors keep going, and both permits are free after."""
    history = History(limit=2)
    rng = random.Random(29)
    duration = 3.0 * scaled(1)
    # a pipe per process: a process killed mid-send can only break its own
    pipes = [ctx.Pipe(duplex=False) for _ in range(4)]
    stop = ctx.Event()
    procs = [
        ctx.Process(target=_hold_in_turn, args=(server.url, n, pipes[n][1], stop)) for n in range(4)
    ]
    for proc in procs:
        proc.start()
    for _, writer in pipes:
        writer.close()  # (the children hold theirs: a reader sees EOF when its child ends)
    readers = {reader for reader, _ in pipes}
    grants: dict[tuple[int, int], Grant] = {}

    def drain(until: float, victim: int | None = None) -> bool:
        """Record events until *until*, or until *victim* reports a grant (then True)."""
        while (left := until - time.monotonic()) > 0 and readers:
            for reader in wait(list(readers), timeout=min(left, 0.05)):
                try:
                    event = cast("Connection", reader).recv()
                except (EOFError, OSError, pickle.UnpicklingError):
                    readers.discard(reader)  # its process ended (or was killed mid-send)
                    continue
                if record(event, victim):
                    return True
        return False

    def record(event: tuple[object, ...], victim: int | None) -> bool:
        if event[0] == "g":
            _, index, i, token, at, expires = event
            grants[(index, i)] = history.granted(  # type: ignore[index]
                Grant("k", token, f"p{index}#{i}", at, expires)  # type: ignore[arg-type]
            )
            return index == victim
        if (grant := grants.get((event[1], event[2]))) is not None:  # type: ignore[arg-type]
            grant.released_at = event[3]  # type: ignore[assignment]
        return False

    # everyone is up when each has had a grant
    deadline = time.monotonic() + 60
    while len({index for index, _ in grants}) < 4 and time.monotonic() < deadline:
        drain(time.monotonic() + 0.1)
    killed_holding = 0
    for victim in (0, 1):
        drain(time.monotonic() + rng.random() * duration / 2)  # the others run meanwhile
        killed_holding += drain(time.monotonic() + 10, victim)
        os.kill(procs[victim].pid, signal.SIGKILL)  # type: ignore[arg-type]
    drain(time.monotonic() + TTL + duration / 2)  # the survivors go on past the TTLs
    stop.set()
    drain(time.monotonic() + 20)  # until every reader saw its process end (bounded)
    for proc in procs:
        proc.join(10)
    assert [proc.exitcode for proc in procs] == [-signal.SIGKILL] * 2 + [0] * 2
    locks = KeyedLock(PostgresBackend.from_url(server.url).permits(2), namespace="sigkill")
    asked = time.monotonic()
    for _ in range(2):  # both permits free again (a dead holder's lapsed)
        lease = locks.acquire_sync("k", timeout=TTL + 2)
        history.granted(Grant("k", lease.token, "after", time.monotonic(), None))
    history.waited(Wait("k", "after", asked, time.monotonic(), TTL + 2, "granted"))
    locks.backend._parent.close_sync()  # type: ignore[attr-defined]
    verdict = history.check()
    chaos_report.record(
        "SIGKILL of a permit holder",
        "postgres, semaphore of limit 2, 4 processes",
        verdict,
        trials=2,
        notes=f"{killed_holding} of 2 killed right after a grant (mid-section)",
    )
    assert verdict.ok, verdict
    assert killed_holding == 2
    assert verdict.grants > 10
