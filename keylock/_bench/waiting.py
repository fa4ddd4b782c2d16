"""What waiting costs the Postgres server: the connections held while 16 callers wait for one
held key, as 16 threads of one process and as 16 processes, per subject (counted in
``pg_stat_activity`` by each run's own application name). A lock whose waiters block in the
server holds one connection per waiter; keylock's waiters hold none of their own (one LISTEN
connection per process wakes them)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from .harness import Row
from .progress import Step

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .harness import Suite

__all__ = ["WAITERS", "LockFor", "MakeLock", "waiting_steps"]

LockFor = Callable[[str], AbstractContextManager[object]]  # key -> a fresh lock, entered once


class MakeLock(Protocol):
    """A subject: its clients on the server at *url* (named *app* in ``pg_stat_activity``)
    and key -> a fresh lock; None when the library is not installed. What it opens is closed
    by the callables it adds to *closers*."""

    def __call__(
        self,
        url: str,
        table: str,
        app: str | None,
        closers: list[Callable[[], object]] | None = None,
    ) -> LockFor | None: ...


WAITERS = 16
_SETTLE = 0.3  # seconds the count must stay the same before it is read


def waiting_steps(
    suite: Suite,
    url: str,
    table: str,
    run_id: str,
    subjects: Mapping[str, MakeLock],
) -> list[Step]:
    """One step: for each installed subject, 16 waiting threads of one process, then 16
    waiting processes; one row each (connections, lower is better)."""

    def measure() -> None:
        for how in ("threads of one process", "processes"):
            workload = f"postgres: connections held by {WAITERS} waiting {how}"
            for name, make in subjects.items():
                count = _held(url, table, f"{run_id}:wait:{how}:{name}", name, make, how, run_id)
                if count is None:
                    continue
                suite.add(
                    Row.of(
                        workload,
                        name,
                        "connections",
                        [count],
                        notes=f"{count / WAITERS:.2f} per waiter",
                    )
                )

    return [
        Step(f"postgres: connections held by {WAITERS} waiters", 2 * len(subjects) * 3.0, measure)
    ]


def _count(url: str, app: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchone()
    return int(row[0]) if row else 0


def _settled(url: str, app: str, at_least: int, timeout: float = 30.0) -> int:
    """The connection count of *app* once it is at least *at_least* and has stopped moving."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = _count(url, app)
        if now != last:
            last, since = now, time.monotonic()
        elif now >= at_least and time.monotonic() - since >= _SETTLE:
            return now
        time.sleep(0.02)
    return last


def _wait_once(
    make: MakeLock,
    url: str,
    table: str,
    app: str,
    key: str,
) -> None:
    """One waiter, in a process of its own: its own lock object (and connections), one turn."""
    lock_for = make(url, table, app)
    assert lock_for is not None
    with lock_for(key):
        pass


def _held(
    url: str,
    table: str,
    key: str,
    name: str,
    make: MakeLock,
    how: str,
    run_id: str,
) -> int | None:
    """Connections of 16 callers waiting for *key* (held meanwhile by another client)."""
    closers: list[Callable[[], object]] = []
    holder = make(url, table, f"kb-{run_id}-holder", closers)
    if holder is None:
        return None
    app = f"kb-{run_id}-{'t' if how.startswith('threads') else 'p'}-{hash(name) & 0xFFFF:x}"
    held = holder(key)
    held.__enter__()
    try:
        if how.startswith("threads"):
            shared = make(url, table, app, closers) if name.startswith("keylock") else None

            def wait() -> None:  # keylock: one backend per process; the peer: a connection each
                lock_for = shared or make(url, table, app, closers)
                assert lock_for is not None
                with lock_for(key):
                    pass

            workers: list[threading.Thread | multiprocessing.process.BaseProcess] = [
                threading.Thread(target=wait, daemon=True) for _ in range(WAITERS)
            ]
        else:
            ctx = multiprocessing.get_context("fork")
            workers = [
                ctx.Process(target=_wait_once, args=(make, url, table, app, key), daemon=True)
                for _ in range(WAITERS)
            ]
        for worker in workers:
            worker.start()
        count = _settled(url, app, at_least=1)
    finally:
        held.__exit__(None, None, None)
    for worker in workers:
        worker.join(60)
    for close in closers:
        close()
    return count
