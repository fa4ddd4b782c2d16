"""Redis semaphores across processes: keylock's KeyedSemaphore on RedisBackend against the
hand-rolled ZSET semaphore of the common recipe (Redis in Action, 6.3.1), in one run.

Workloads: uncontended acquire+release in PING round trips (each op timed beside a PING, as
the lock's rows are: see roundtrips.py); a semaphore of limit 4 with 16 worker processes on one
key. A witness on the server, independent of the semaphore under test, counts violations
(more than 4 holders inside at once).

The recipe, as it is usually copied: ``MULTI; ZREMRANGEBYSCORE name -inf now-timeout; ZADD name
now id; ZRANK name id; EXEC``, held if the rank is below the limit, else ``ZREM`` and retry
after 1 ms; released by ``ZREM``. It has no FIFO (a retry may pass an older waiter), no
fencing token, no renewal (a holder past ``timeout`` is dropped while it works), and it trusts
the clients' clocks to agree.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import redis
import redis.asyncio

from .. import KeyedSemaphore
from ..backends.redis import RedisBackend
from .contend import Run, SyncLockFor, Witness, run_processes
from .harness import Row, rotated, wait_figures
from .progress import Step
from .roundtrips import Pair, add_rows, paired, paired_async

if TYPE_CHECKING:
    from .harness import Suite

__all__ = ["ZsetSemaphore", "steps"]

LIMIT = 4
WORKERS = 16
FAMILY = "redis, processes"
KEY_TTL_S = 600  # every key a run makes expires by then, even if the run is killed
_GRACE = 1.0  # seconds a worker may go on waiting after the deadline

KeySem = Callable[[str], AbstractContextManager[object]]  # key -> a fresh permit, entered once


class ZsetSemaphore:
    """The common hand-rolled Redis semaphore (a peer for the benchmark, not for use)."""

    def __init__(
        self, client: redis.Redis, name: str, limit: int, *, timeout: float = 30.0
    ) -> None:
        self._client = client
        self._name = name
        self._limit = limit
        self._timeout = timeout

    def try_acquire(self) -> str | None:
        identifier = uuid.uuid4().hex
        now = time.time()
        pipe = self._client.pipeline(transaction=True)
        pipe.zremrangebyscore(self._name, "-inf", now - self._timeout)
        pipe.zadd(self._name, {identifier: now})
        pipe.expire(self._name, KEY_TTL_S)
        pipe.zrank(self._name, identifier)
        if pipe.execute()[-1] < self._limit:
            return identifier
        self._client.zrem(self._name, identifier)
        return None

    @contextmanager
    def hold(self) -> Iterator[str]:
        while (identifier := self.try_acquire()) is None:
            time.sleep(0.001)
        try:
            yield identifier
        finally:
            self._client.zrem(self._name, identifier)


def _subjects(
    url: str, run_id: str, closers: list[Callable[[], object]] | None = None
) -> list[tuple[str, Callable[[], KeySem]]]:
    """name -> a factory run once per process: its clients, and key -> a permit to hold."""

    def keylock() -> KeySem:
        sem = KeyedSemaphore(RedisBackend.from_url(url, prefix=run_id), limit=LIMIT)
        if closers is not None:
            closers.append(sem.close_sync)
        return lambda key: sem.sync(key)

    def recipe() -> KeySem:
        client = redis.Redis.from_url(url)
        if closers is not None:
            closers.append(client.close)
        return lambda key: ZsetSemaphore(client, f"{run_id}:zset:{key}", LIMIT).hold()

    return [("keylock KeyedSemaphore (sync)", keylock), ("hand-rolled ZSET semaphore", recipe)]


def steps(suite: Suite, url: str, run_id: str) -> list[Step]:
    """The Redis semaphore workloads on the server at *url* (keys carry *run_id*)."""
    repeats = 2 if suite.quick else 5
    seconds = 0.5 if suite.quick else 1.0
    return [
        Step(
            "redis: uncontended semaphore acquire+release",
            3 * repeats * (0.3 if suite.quick else 0.8),
            lambda: _uncontended(suite, url, run_id, repeats),
        ),
        Step(
            f"{FAMILY}: semaphore limit {LIMIT}, {WORKERS} processes",
            2 * repeats * (seconds + 0.6),
            lambda: _contended(suite, url, run_id, repeats, seconds),
        ),
    ]


# ---------------------------------------------------------------------- uncontended


def _uncontended(suite: Suite, url: str, run_id: str, repeats: int) -> None:
    n = 300 if suite.quick else 1_000
    budget = 0.5 if suite.quick else 1.5
    closers: list[Callable[[], object]] = []
    subjects = [(name, make()) for name, make in _subjects(url, run_id, closers)]
    pinger = redis.Redis.from_url(url)
    figures: dict[str, list[Pair]] = {}
    for _ in range(repeats):  # interleaved, so drift hits every subject alike
        for name, sem_for in subjects:
            key = f"{run_id}:uncontended"

            def op(sem_for: KeySem = sem_for, key: str = key) -> None:
                with sem_for(key):
                    pass

            op()  # connect, load scripts
            figures.setdefault(name, []).append(paired(op, pinger.ping, n, budget))
        figures.setdefault("keylock KeyedSemaphore (async)", []).append(
            _async_keylock(url, run_id, n)
        )
    pinger.close()
    for close in closers:
        close()
    add_rows(
        suite, "redis: uncontended semaphore acquire+release", "PING round trip", "PINGs", figures
    )


def _async_keylock(url: str, run_id: str, n: int) -> Pair:
    async def body() -> Pair:
        sem = KeyedSemaphore(RedisBackend.from_url(url, prefix=run_id), limit=LIMIT)
        pinger = redis.asyncio.Redis.from_url(url)

        async def op() -> None:
            async with sem(f"{run_id}:async"):
                pass

        await op()
        await pinger.ping()
        pair = await paired_async(op, pinger.ping, n)
        await sem.close()
        await pinger.aclose()
        return pair

    return asyncio.run(body())


# ----------------------------------------------------------------------- contention


class _LimitWitness(Witness):
    """A holder counter per key on the server: more than LIMIT inside is a violation."""

    def __init__(self, url: str, prefix: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._prefix = prefix

    def enter(self, key: int, me: int) -> tuple[bool, bool]:
        pipe = self._client.pipeline(transaction=False)
        inside = f"{self._prefix}:{key}:inside"
        pipe.incr(inside)
        pipe.expire(inside, KEY_TTL_S)
        count, _ = pipe.execute()
        return count > LIMIT, False

    def leave(self, key: int, violated: bool) -> None:
        self._client.decr(f"{self._prefix}:{key}:inside")


def _processes(url: str, run_id: str, name: str) -> Callable[[Sequence[Sequence[int]], float], Run]:
    def run(keys: Sequence[Sequence[int]], seconds: float) -> Run:
        prefix = f"{run_id}:{uuid.uuid4().hex[:12]}"  # fresh keys: a run never sees the last's

        def make() -> tuple[SyncLockFor, Witness]:  # in each worker process
            sem_for = dict(_subjects(url, run_id))[name]()
            return lambda key: sem_for(f"{prefix}:{key}"), _LimitWitness(url, prefix)

        return run_processes(make, keys, seconds, grace=_GRACE)

    return run


def _contended(suite: Suite, url: str, run_id: str, repeats: int, seconds: float) -> None:
    """16 processes on one key, limit 4: acquisitions/s, waits, violations."""
    workload = f"{FAMILY}: semaphore limit {LIMIT}, one key"
    subjects = [(name, _processes(url, run_id, name)) for name, _ in _subjects(url, run_id)]
    runs: dict[str, list[Run]] = {name: [] for name, _ in subjects}
    keys = [[0]] * WORKERS
    for _, name, run in rotated(subjects, repeats):
        runs[name].append(run(keys, seconds))
    for name, done in runs.items():
        extra = wait_figures([r.waits for r in done])
        extra["violations"] = float(sum(r.violations for r in done))
        extra["ops_per_s"] = sorted(r.ops for r in done)[len(done) // 2]
        suite.add(
            Row.of(
                workload,
                name,
                "acquisitions/s",
                [r.ops for r in done],
                higher_is_better=True,
                notes=f"p99 wait {extra.get('wait_p99_ms', 0):.1f} ms, "
                f"{extra['violations']:.0f} violations",
                extra=extra,
                workers=WORKERS,
            )
        )
