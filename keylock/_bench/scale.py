"""Redis at the scale of one process (``--full``): 10,000 auto-renewed leases held at once by
one RedisBackend behind a 40 ms round trip, none lost; 10,000 waiters on one key over 8
processes, served in arrival order per client, with the hand-offs and the memory per waiter;
and where one hot-key hand-off spends its time (:mod:`.hops`).

The round trip comes from a delaying TCP proxy on loopback (:mod:`._proxy`), so the run needs a
server on this host (the one the bench starts, or a loopback ``--redis-url``). How long the
leases are held: 60 s in a full run, 3 s in a quick one, ``KEYLOCK_BENCH_HOLD_S`` to override.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import tempfile
import time
import tracemalloc
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from .. import KeyedLock
from ..backends.redis import RedisBackend
from . import hops
from ._proxy import Proxy
from .contend import FileWitness
from .harness import Row, Suite
from .progress import Step
from .redis import _delete_run_keys
from .servers import redis_server

if TYPE_CHECKING:
    from contextlib import ExitStack
    from multiprocessing.connection import Connection
    from multiprocessing.synchronize import Event

__all__ = ["steps"]

TTL = 2.0
ROUND_TRIP = 0.040
PROCESSES = 8
_LOOPBACK = ("127.0.0.1", "localhost", "::1")

# one child's report: its waiters' indices in grant order, hand-offs from another process,
# violations, keylock's bytes while all its waiters queued, when its last waiter was granted
_Report = tuple[list[int], int, int, int, float]


def steps(suite: Suite, stack: ExitStack, *, redis_url: str | None = None) -> list[Step]:
    """Both workloads in a full or quick run (none in the headline run); rows go to *suite*."""
    if suite.headline:
        return []
    url = stack.enter_context(redis_server(redis_url, suite))
    if url is None:
        return []
    run_id = f"keylock-bench-{uuid.uuid4().hex[:12]}"
    if redis_url is not None:
        stack.callback(_delete_run_keys, url, run_id, suite)
    leases = 500 if suite.quick else 10_000
    waiters = 400 if suite.quick else 10_000
    hold = float(os.environ.get("KEYLOCK_BENCH_HOLD_S", "3" if suite.quick else "60"))
    return [
        Step(
            f"redis at scale: {leases:,} auto-renewed leases behind a 40 ms round trip",
            hold + leases / 1_500,
            lambda: _leases(suite, url, run_id, leases, hold),
        ),
        Step(
            f"redis at scale: {waiters:,} waiters on one key over {PROCESSES} processes",
            2 + waiters / 1_000,
            lambda: _crowd(suite, url, run_id, waiters),
        ),
        Step(
            "redis: where one hot-key hand-off spends its time, 2 processes",
            (2 if suite.quick else 5) * (3 if suite.quick else 6),
            lambda: hops.run(suite, url, run_id, 2 if suite.quick else 5),
        ),
    ]


# ------------------------------------------------------------------------------ leases


def _leases(suite: Suite, url: str, run_id: str, count: int, hold: float) -> None:
    """Take *count* leases (no delay yet), put 20 ms on each direction, hold them *hold*
    seconds while the one renewer thread keeps them, count the lost ones and its round trips."""
    parts = urlsplit(url)
    if parts.hostname not in _LOOPBACK or parts.port is None:
        suite.say("redis at scale: the 40 ms proxy needs a server on this host; skipped")
        return
    workload = f"redis at scale: {count:,} leases, TTL {TTL:g} s, 40 ms round trip, {hold:g} s"
    with Proxy(parts.port, host=parts.hostname) as proxy:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        proxied = urlunsplit(parts._replace(netloc=f"{netloc}{parts.hostname}:{proxy.port}"))
        backend = RedisBackend.from_url(proxied, ttl=TTL, prefix=f"{run_id}:leases")
        locks = KeyedLock(backend)
        try:
            taken = time.monotonic()
            held = [locks.acquire_sync(f"lease:{i}") for i in range(count)]
            taken = time.monotonic() - taken
            trips = _count_trips(backend)
            proxy.set(up_delay=ROUND_TRIP / 2, down_delay=ROUND_TRIP / 2)
            start = time.monotonic()
            lost_at: float | None = None
            while (now := time.monotonic()) - start < hold:
                if lost_at is None and any(lease.lost for lease in held):
                    lost_at = now - start
                time.sleep(min(0.5, max(hold - (now - start), 0.0)))
            elapsed = time.monotonic() - start
            lost = sum(lease.lost for lease in held)
            proxy.heal()
            for lease in held:
                if not lease.lost:
                    lease.release_sync()
        finally:
            locks.close_sync()
    per_ttl = elapsed / TTL
    first = f"; the first lost after {lost_at:.1f} s" if lost_at is not None else ""
    suite.add(
        Row.of(
            workload,
            "keylock RedisBackend (auto-renew)",
            "leases lost",
            [float(lost)],
            notes=f"of {count:,}{first}; taken in {taken:.1f} s before the delay went on",
            extra={"lost": float(lost), "leases": float(count)},
        )
    )
    suite.add(
        Row.of(
            workload,
            "keylock RedisBackend (auto-renew)",
            "round trips/lease/TTL",
            [trips.calls / count / per_ttl],
            notes=f"{trips.calls:,} pipelined round trips renewed {trips.renewed:,} leases "
            f"({trips.renewed / count / per_ttl:.2f} renewals per lease per TTL; slowest "
            f"round trip {trips.slowest * 1e3:.0f} ms; the renewer thread busy "
            f"{min(trips.busy / elapsed, 1.0):.0%} of the time)",
            extra={
                "round_trips": float(trips.calls),
                "renewals": float(trips.renewed),
                "slowest_ms": trips.slowest * 1e3,
                "busy": trips.busy / elapsed,
            },
        )
    )


class _Trips:
    """What the renewer sent: round trips, leases renewed, its slowest trip, time spent."""

    calls = 0
    renewed = 0
    slowest = 0.0
    busy = 0.0


def _count_trips(backend: RedisBackend) -> _Trips:
    """Count the renewer's round trips from now on (each renews one pipelined batch)."""
    renewer = backend._renewer
    if renewer is None:
        raise RuntimeError("the backend has no renewer: are its leases auto-renewed?")
    trips = _Trips()
    renew = renewer._renew

    def counted(batch: list[tuple[str, bytes, float]]) -> list[object]:
        sent = time.monotonic()
        try:
            return renew(batch)
        finally:
            took = time.monotonic() - sent
            trips.calls += 1
            trips.renewed += len(batch)
            trips.slowest = max(trips.slowest, took)
            trips.busy += took

    renewer._renew = counted
    return trips


# ------------------------------------------------------------------------------ waiters


def _crowd(suite: Suite, url: str, run_id: str, count: int) -> None:
    """*count* asyncio waiters, an equal share in each of 8 processes (one RedisBackend each),
    queue on one key held by this process; once all wait it lets go and they are served."""
    key = "crowd"
    share = count // PROCESSES
    workload = f"redis at scale: {share * PROCESSES:,} waiters on one key, {PROCESSES} processes"
    ctx = multiprocessing.get_context("fork")
    children = []
    with tempfile.TemporaryDirectory(prefix="keylock-bench-crowd-") as directory:
        witness = FileWitness(directory, 1)
        held = ctx.Event()
        try:
            for me in range(1, PROCESSES + 1):  # forked before this process has any client
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_child,
                    args=(url, f"{run_id}:crowd", key, share, witness, me, held, send),
                    daemon=True,
                )
                proc.start()
                send.close()
                children.append((proc, receive))
            holder_locks = KeyedLock(RedisBackend.from_url(url, prefix=f"{run_id}:crowd"))
            try:
                holder = holder_locks.acquire_sync(key)
                held.set()
                for proc, receive in children:  # each child's waiters all wait
                    if not receive.poll(120) or receive.recv() != "queued":
                        raise RuntimeError(f"benchmark worker {proc.pid} did not queue")
                released = time.monotonic()
                holder.release_sync()
                reports: list[_Report] = []
                failures: list[str] = []
                for proc, receive in children:
                    if not receive.poll(300):
                        raise RuntimeError(f"benchmark worker {proc.pid} sent no result")
                    got = receive.recv()
                    if isinstance(got, str):
                        failures.append(got)
                    else:
                        reports.append(got)
            finally:
                holder_locks.close_sync()
        finally:
            held.set()  # a child still waiting for it gives up with the pipe closed
            for proc, receive in children:
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                receive.close()
    if failures:
        suite.say(f"redis at scale: {len(failures)} of {PROCESSES} clients failed: {failures[0]}")
        suite.add(
            Row.of(
                workload,
                "keylock RedisBackend",
                "clients failed",
                [float(len(failures))],
                notes=f"of {PROCESSES}: {failures[0]}",
                extra={"failed_clients": float(len(failures))},
            )
        )
        return
    served_in = max(r[4] for r in reports) - released
    served = sum(len(order) for order, *_ in reports)
    out_of_order = sum(order != sorted(order) for order, *_ in reports)
    across = sum(r[1] for r in reports)
    violations = sum(r[2] for r in reports)
    per_waiter = [r[3] / share for r in reports if r[3] >= 0]
    notes = (
        f"{served:,} hand-offs (one per waiter) in {served_in:.1f} s, {across:,} of them to "
        "another process; FIFO per client: "
        + ("yes" if not out_of_order else f"NO, {out_of_order} clients out of order")
        + f"; keylock's memory per queued waiter {max(per_waiter):,.0f} bytes (tracemalloc, in"
        " one of the clients)"
    )
    suite.add(
        Row.of(
            workload,
            "keylock RedisBackend",
            "hand-offs/s",
            [served / served_in],
            higher_is_better=True,
            notes=notes,
            extra={
                "violations": float(violations),
                "served": float(served),
                "across_processes": float(across),
                "out_of_order_clients": float(out_of_order),
                "bytes_per_waiter": max(per_waiter),
            },
        )
    )


def _child(
    url: str,
    prefix: str,
    key: str,
    share: int,
    witness: FileWitness,
    me: int,
    held: Event,
    conn: Connection[object, object],
) -> None:
    """One client: once the key is *held*, *share* waiters queue in arrival order; report
    their grant order."""

    async def body() -> _Report:
        locks = KeyedLock(RedisBackend.from_url(url, prefix=prefix))
        order: list[int] = []
        handoffs = violations = 0
        last_grant = 0.0

        async def waiter(i: int) -> None:
            nonlocal handoffs, violations, last_grant
            lease = await locks.acquire(key)
            last_grant = time.monotonic()
            violated, handoff = witness.enter(0, me)
            order.append(i)
            handoffs += handoff
            violations += violated
            witness.leave(0, violated)
            await lease.release()

        await asyncio.get_running_loop().run_in_executor(None, held.wait, 120)
        # one client measures memory: a snapshot blocks its loop, and eight at once on a
        # loaded machine held replies unread past the client's 5 s timeout
        measured = me == 1
        if measured:
            gc.collect()
            tracemalloc.start()
        before = _keylock_bytes(tracemalloc.take_snapshot()) if measured else 0
        tasks = []
        for i in range(share):
            tasks.append(asyncio.create_task(waiter(i)))
            await asyncio.sleep(0)  # each one queued before the next arrives: a known order
        for _ in range(6_000):  # bounded: 60 s
            if locks.statistics(key).waiting >= share:
                break
            await asyncio.sleep(0.01)
        queued = _keylock_bytes(tracemalloc.take_snapshot()) - before if measured else -1
        tracemalloc.stop()
        conn.send("queued")
        await asyncio.gather(*tasks)
        await locks.close()
        return order, handoffs, violations, queued, last_grant

    try:
        report: object = asyncio.run(body())
    except Exception as exc:  # reported as the row's finding, not a crashed run
        report = f"{type(exc).__name__}: {exc}"
    conn.send(report)
    conn.close()


def _keylock_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated by keylock's library code (its innermost frame in keylock, not in the
    benchmark's own modules)."""
    mine = snapshot.filter_traces(
        [tracemalloc.Filter(True, "*/keylock/*"), tracemalloc.Filter(False, "*/keylock/_bench/*")]
    )
    return sum(stat.size for stat in mine.statistics("filename"))
