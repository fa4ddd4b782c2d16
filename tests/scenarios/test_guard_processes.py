"""Issue 11 point 7: a burst of identical failures across 5 worker processes, handled once.

Five processes share one lock (FileBackend on one directory, or RedisBackend on one server);
each receives the same failure event and calls the same ``stale_guard``-ed handler, without a
snapshot. The parent holds the key until all five have arrived (each has read the count of
completions and asked for the lock), then lets them go: the first one handles the failure,
the four others must see that a call completed after they arrived and drop theirs.

On the old code the "completed after you arrived" bookkeeping was per process: each process
saw only its own call, and all five handled the failure (5 handled, 0 dropped).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import time
from pathlib import Path

import pytest

from keylock import SUPERSEDED, KeyedLock, stale_guard
from keylock.backends import Backend, FileBackend

from .._redis_server import Server

WORKERS = 5
KEY = "agent:42"
ctx = multiprocessing.get_context("forkserver")


def _backend(kind: str, where: str, arrived: multiprocessing.synchronize.Event | None) -> Backend:
    """The shared backend; with *arrived*, one that says when this process asks for the lock
    (after the guard read the count of completions)."""
    if kind == "file":

        class SignallingFile(FileBackend):
            def _try_acquire(self, *args: object) -> object:  # type: ignore[override]
                if arrived is not None:
                    arrived.set()
                return super()._try_acquire(*args)  # type: ignore[arg-type]

        return SignallingFile(where)
    from keylock.backends import RedisBackend

    class SignallingRedis(RedisBackend):
        def acquire_sync(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            if arrived is not None:
                arrived.set()
            return super().acquire_sync(*args, **kwargs)  # type: ignore[arg-type]

    return SignallingRedis.from_url(where)


def _worker(
    kind: str,
    where: str,
    journal: str,
    arrived: multiprocessing.synchronize.Event,
    results: multiprocessing.Queue[str],
) -> None:
    locks = KeyedLock(_backend(kind, where, arrived))

    @stale_guard(locks, key=lambda agent, failed: f"agent:{agent}")
    def on_failure(agent: int, failed: str) -> str:
        with open(journal, "a") as fh:  # the side effect: once per failure
            fh.write(f"{os.getpid()} switched {failed}\n")
        return "handled"

    outcome = on_failure(42, "A")
    results.put("dropped" if outcome is SUPERSEDED else str(outcome))
    locks.close_sync()


def _burst(kind: str, where: str, tmp_path: Path) -> tuple[list[str], list[str]]:
    journal = tmp_path / "journal"
    journal.write_text("")
    gate_locks = KeyedLock(_backend(kind, where, None))
    gate = gate_locks.acquire_sync(KEY)  # every worker will queue behind this
    results: multiprocessing.Queue[str] = ctx.Queue()
    events = [ctx.Event() for _ in range(WORKERS)]
    procs = [
        ctx.Process(target=_worker, args=(kind, where, str(journal), event, results))
        for event in events
    ]
    for proc in procs:
        proc.start()
    try:
        for event in events:
            assert event.wait(60), "a worker never asked for the lock"
        gate.release_sync()
        outcomes = sorted(results.get(timeout=60) for _ in procs)
    finally:
        for proc in procs:
            proc.join(60)
        gate_locks.close_sync()
    assert all(proc.exitcode == 0 for proc in procs)
    return outcomes, journal.read_text().splitlines()


def test_a_burst_across_five_processes_on_a_file_lock_is_handled_once(tmp_path: Path) -> None:
    started = time.monotonic()
    outcomes, journal = _burst("file", str(tmp_path / "locks"), tmp_path)
    assert outcomes == ["dropped"] * (WORKERS - 1) + ["handled"]
    assert len(journal) == 1
    # a failure arriving after the burst was handled is a new one: it runs
    again, journal = _burst("file", str(tmp_path / "locks"), tmp_path)
    assert again.count("handled") == 1
    assert time.monotonic() - started < 100


def test_a_burst_across_five_processes_on_redis_is_handled_once(
    tmp_path: Path, redis_server: Server
) -> None:
    redis_server.flush()
    outcomes, journal = _burst("redis", redis_server.url, tmp_path)
    assert outcomes == ["dropped"] * (WORKERS - 1) + ["handled"]
    assert len(journal) == 1


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_the_count_lives_beside_the_lock(kind: str, tmp_path: Path, redis_server: Server) -> None:
    """Where the count is stored (what an operator finds): a ``.done`` file that ``prune()``
    leaves alone, or a Redis key in the lock's hash tag with an expiry."""
    import redis

    redis_server.flush()
    where = str(tmp_path / "locks") if kind == "file" else redis_server.url
    locks = KeyedLock(_backend(kind, where, None))

    @stale_guard(locks, key=lambda: KEY)
    def handle() -> int:
        return 1

    assert handle() == 1
    assert handle() == 1  # sequential calls each arrive after the previous completion
    if kind == "file":
        done = [name for name in os.listdir(where) if name.endswith(".done")]
        assert len(done) == 1
        assert done[0].startswith("agent_42.")
        assert (Path(where) / done[0]).read_text() == "2"
        assert isinstance(locks.backend, FileBackend)
        locks.backend.prune()
        assert (Path(where) / done[0]).exists()
    else:
        client = redis.Redis.from_url(redis_server.url)
        [name] = client.keys("keylock:{agent:42}:done:*")
        assert client.get(name) == b"2"
        assert 0 < client.ttl(name) <= 86_400
        client.close()
    locks.close_sync()


async def test_async_handlers_on_two_redis_backends_share_the_count(redis_server: Server) -> None:
    """The async path of the Redis count: two backends (as two hosts would have) each run the
    same guarded async handler; the second call arrives while the first runs, and is dropped
    once the first completes. On the old code each guard counted alone: both ran."""
    import asyncio

    from keylock.backends import RedisBackend

    redis_server.flush()
    queued = asyncio.Event()

    class Signalling(RedisBackend):
        async def acquire(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            queued.set()
            return await super().acquire(*args, **kwargs)  # type: ignore[arg-type]

    ran: list[str] = []
    first_inside = asyncio.Event()
    finish = asyncio.Event()

    def make(locks: KeyedLock) -> object:
        @stale_guard(locks, key=lambda who: KEY)
        async def handle(who: str) -> str:
            ran.append(who)
            first_inside.set()
            await finish.wait()
            return who

        return handle

    one = KeyedLock(RedisBackend.from_url(redis_server.url))
    two = KeyedLock(Signalling.from_url(redis_server.url))
    first = asyncio.create_task(make(one)("one"))  # type: ignore[operator]
    await asyncio.wait_for(first_inside.wait(), 30)
    second = asyncio.create_task(make(two)("two"))  # type: ignore[operator]
    await asyncio.wait_for(queued.wait(), 30)
    finish.set()
    assert await asyncio.wait_for(asyncio.gather(first, second), 30) == ["one", SUPERSEDED]
    assert ran == ["one"]
    await one.close()
    await two.close()
