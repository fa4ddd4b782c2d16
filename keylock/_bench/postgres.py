"""Cross-process workloads on one PostgreSQL: keylock's PostgresBackend (a lease table; waiters
woken by LISTEN/NOTIFY) against ``postgresql-lock`` (a session advisory lock: each waiter blocks
in ``pg_advisory_lock`` on its own connection), in one run: uncontended acquire+release in
``SELECT 1`` round trips, one hot key with 1-16 processes, 1,000 Zipf keys, and the
connections that waiting holds.

Not in the default (headline) run, which stays about two minutes: ``--full``, ``--only
postgres`` or ``--postgres-url`` runs it. Without ``--postgres-url`` PostgreSQL is started from
the pgserver wheel. On the user's server keylock's rows live in a table of this run's own
(``keylock_bench_<run id>``), dropped with its functions at the end, even after Ctrl-C."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from typing import TYPE_CHECKING

from .. import KeyedLock
from .contend import FileWitness, Run, SyncLockFor, Witness, run_processes
from .harness import INSTALL, MIN_RUNS
from .progress import Step
from .roundtrips import Pair, add_rows, paired, paired_async
from .servers import postgres_server
from .waiting import LockFor, MakeLock, waiting_steps
from .workload import HEADLINE_WORKERS, WORKERS, Subjects, estimate, hot_key_steps, zipf

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from contextlib import ExitStack

    from .harness import Suite

__all__ = ["SUBJECTS", "steps"]

FAMILY = "postgres, processes"
KEYLOCK = "keylock PostgresBackend (sync)"
KEYLOCK_DURABLE = "keylock PostgresBackend (sync, durable=True)"
PEER = "postgresql-lock (advisory)"
_ROUND_TRIP = "SELECT 1 round trip"

#: Seconds a run over processes spends outside its clock (fork, connect, schema, warm-up).
_OVERHEAD = 0.5


def _keylock(
    url: str,
    table: str,
    app: str | None,
    closers: list[Callable[[], object]] | None = None,
    *,
    durable: bool = False,
) -> LockFor | None:
    from ..backends import PostgresBackend

    backend = PostgresBackend.from_url(
        url, table=table, durable=durable, application_name=app or ""
    )
    locks = KeyedLock(backend)
    if closers is not None:
        closers.append(locks.close_sync)
    return lambda key: locks.sync(key)


def _keylock_durable(
    url: str, table: str, app: str | None, closers: list[Callable[[], object]] | None = None
) -> LockFor | None:
    """keylock waiting for the WAL flush at every grant (``durable=True``, the option), on
    logged tables of its own (a durable backend makes the tables it uses logged, for all)."""
    return _keylock(url, f"{table}_durable", app, closers, durable=True)


def _peer(
    url: str, table: str, app: str | None, closers: list[Callable[[], object]] | None = None
) -> LockFor | None:
    """postgresql-lock as its README shows it: a Lock on the caller's own connection."""
    try:
        import postgresql_lock
    except ImportError:
        return None
    import psycopg

    conn = psycopg.connect(url, autocommit=True, application_name=app or "")
    if closers is not None:
        closers.append(conn.close)
    return lambda key: postgresql_lock.Lock(conn, key)


#: name -> make(url, table, application name, closers): key -> a fresh lock (None: the peer
#: is not installed). keylock's is made once per process; the peer's once per connection.
SUBJECTS: dict[str, MakeLock] = {
    KEYLOCK: _keylock,
    KEYLOCK_DURABLE: _keylock_durable,
    PEER: _peer,
}


def steps(
    suite: Suite, stack: ExitStack, *, postgres_url: str | None = None, asked: bool = False
) -> list[Step]:
    """The Postgres workloads (none in a headline run unless *postgres_url* is given or the
    suite was *asked* for by name); rows go to *suite*; *stack* stops the server it started
    or drops the run's table from the user's."""
    if suite.headline and postgres_url is None and not asked:
        suite.say("postgres: not in the default run (--full, --only postgres or --postgres-url)")
        return []
    url = stack.enter_context(postgres_server(postgres_url, suite))
    if url is None:
        return []
    import psycopg

    run_id = uuid.uuid4().hex[:12]
    table = f"keylock_bench_{run_id}"
    if postgres_url is not None:
        stack.callback(_drop_run_table, url, table, suite)
        stack.callback(_drop_run_table, url, f"{table}_durable", suite)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT current_setting('server_version')").fetchone()
    suite.info["postgres"] = f"PostgreSQL {row[0] if row else '?'}"
    directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="keylock-bench-pg-"))
    seconds = 0.5 if suite.quick else 1.0
    repeats = 2 if suite.quick else MIN_RUNS  # (the spread is stated over at least 5 runs)
    subjects: Subjects = [
        (name, _processes(url, table, run_id, name, directory) if _installed(name) else None)
        for name in SUBJECTS
    ]
    repeats_uncontended = 3 if suite.quick else 5
    found = [
        Step(
            "postgres: uncontended acquire+release",
            4 * repeats_uncontended * (0.6 if suite.quick else 1.6),
            lambda: _uncontended(suite, url, table, run_id, repeats_uncontended),
        ),
        *hot_key_steps(
            suite,
            FAMILY,
            "process",
            subjects,
            seconds=seconds,
            repeats=repeats,
            workers=(HEADLINE_WORKERS,) if suite.headline else WORKERS,
            overhead=_OVERHEAD,
        ),
    ]
    if not suite.headline:
        found.append(
            Step(
                f"{FAMILY}: 1,000 Zipf keys",
                estimate(subjects, seconds, repeats, overhead=_OVERHEAD),
                lambda: zipf(suite, FAMILY, "process", subjects, seconds=seconds, repeats=repeats),
            )
        )
    waiting = {name: SUBJECTS[name] for name in (KEYLOCK, PEER)}  # durable or not: alike
    return [*found, *waiting_steps(suite, url, table, run_id, waiting)]


def _installed(name: str) -> bool:
    if name != PEER:
        return True
    try:
        import postgresql_lock  # noqa: F401
    except ImportError:
        return False
    return True


def _drop_run_table(url: str, table: str, suite: Suite) -> None:
    """Drop this run's lease table, its line and its functions (functions first: they return
    the line's row type)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        functions = conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE starts_with(proname, %s)",
            (table,),
        ).fetchall()
        for (function,) in functions:
            conn.execute(f"DROP FUNCTION IF EXISTS {function}")
        conn.execute(
            f"DROP TABLE IF EXISTS {table}, {table}_queue, {table}_permit_keys, "
            f"{table}_permits, {table}_permit_queue"
        )
    suite.say(f"postgres: dropped this run's table {table} and its {len(functions)} functions")


# ---------------------------------------------------------------------- uncontended


def _uncontended(suite: Suite, url: str, table: str, run_id: str, repeats: int) -> None:
    """Acquire+release in SELECT 1 round trips (each op timed beside one), and in us."""
    import psycopg

    n = 300 if suite.quick else 1_000
    budget = 0.5 if suite.quick else 1.5
    if not _installed(PEER):
        suite.say(f"{PEER}: not installed, skipped ({INSTALL})")
    closers: list[Callable[[], object]] = []
    subjects = [
        (name, lock_for)
        for name, make in SUBJECTS.items()
        if (lock_for := make(url, table, None, closers)) is not None
    ]
    subjects += _permit_subjects(url, table, closers)
    figures: dict[str, list[Pair]] = {}
    with psycopg.connect(url, autocommit=True) as pinger:

        def ping() -> None:
            pinger.execute("SELECT 1").fetchone()

        for _ in range(repeats):  # interleaved, so drift hits every subject alike
            for name, lock_for in subjects:
                key = f"{run_id}:uncontended:{name}"

                def op(lock_for: LockFor = lock_for, key: str = key) -> None:
                    with lock_for(key):
                        pass

                op()  # connect, create the schema
                figures.setdefault(name, []).append(paired(op, ping, n, budget))
            figures.setdefault("keylock PostgresBackend (async)", []).append(
                _async_keylock(url, table, run_id, n)
            )
    for close in closers:
        close()
    add_rows(suite, "postgres: uncontended acquire+release", _ROUND_TRIP, "SELECT 1s", figures)


def _permit_subjects(
    url: str, table: str, closers: list[Callable[[], object]]
) -> list[tuple[str, LockFor]]:
    """keylock's Postgres permits, uncontended: a semaphore (limit 4) and an RW lock's
    writer, sync, on the run's table."""
    from .. import KeyedRWLock, KeyedSemaphore
    from ..backends import PostgresBackend

    backend = PostgresBackend.from_url(url, table=table)
    closers.append(backend.close_sync)
    sem = KeyedSemaphore(backend, limit=4)
    rw = KeyedRWLock(backend)
    return [
        ("keylock PostgresBackend semaphore (sync, limit 4)", lambda key: sem.sync(key)),
        ("keylock PostgresBackend RW lock (sync, writer)", lambda key: rw.write_sync(key)),
    ]


def _async_keylock(url: str, table: str, run_id: str, n: int) -> Pair:
    import psycopg

    from ..backends import PostgresBackend

    async def body() -> Pair:
        locks = KeyedLock(PostgresBackend.from_url(url, table=table))
        pinger = await psycopg.AsyncConnection.connect(url, autocommit=True)

        async def op() -> None:
            async with locks(f"{run_id}:uncontended:async"):
                pass

        async def ping() -> None:
            await (await pinger.execute("SELECT 1")).fetchone()

        await op()
        pair = await paired_async(op, ping, n)
        await locks.close()
        await pinger.close()
        return pair

    return asyncio.run(body())


# -------------------------------------------------------------------------- contention


def _processes(
    url: str, table: str, run_id: str, name: str, directory: str
) -> Callable[[Sequence[Sequence[int]], float], Run]:
    def run(keys: Sequence[Sequence[int]], seconds: float) -> Run:
        # one host: marker files and shared memory witness exclusion at no server round trip
        witness = FileWitness(directory, 1 + max(max(seq) for seq in keys))
        prefix = f"{run_id}:{uuid.uuid4().hex[:8]}"  # fresh keys: a run never sees the last's

        def make() -> tuple[SyncLockFor, Witness]:  # in each worker process
            lock = SUBJECTS[name](url, table, None)
            assert lock is not None
            names = [f"{prefix}:{key}" for key in range(1 + max(max(seq) for seq in keys))]
            return lambda key: lock(names[key]), witness

        return run_processes(make, keys, seconds, grace=1.0)

    return run
