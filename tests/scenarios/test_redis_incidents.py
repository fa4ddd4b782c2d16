"""The incident patterns on Redis, between separate clients and separate processes, against a
real server the tests start. Each shows the naive read-check-write version failing too."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time

import pytest
import redis

from keylock import KeyedLock, LeaseLost, SingleFlight, StaleToken
from keylock.backends import RedisBackend
from keylock.fencing import fenced_set_sync

from .._redis_server import Server, running_server
from .test_batch_promotion import _agrees, _trial

ctx = multiprocessing.get_context("fork")


@pytest.fixture
def server(redis_server: Server) -> Server:
    redis_server.flush()
    return redis_server


async def test_twenty_four_claimers_on_separate_clients_one_winner(server: Server) -> None:
    """Incident 4 across hosts: each claimer has its own client and backend."""
    raw = redis.asyncio.Redis.from_url(server.url)
    backends = [RedisBackend.from_url(server.url) for _ in range(24)]

    async def claim(i: int, locked: bool) -> None:
        async def read_decide_write() -> None:
            if await raw.get("job:1:owner") is None:  # read + decide ...
                await asyncio.sleep(0.005)  # ... a hop ...
                await raw.set("job:1:owner", f"w{i}")  # ... write
                await raw.rpush("job:1:winners", f"w{i}")

        if locked:
            async with KeyedLock(backends[i])("job:1", timeout=30):
                await read_decide_write()
        else:
            await read_decide_write()

    await asyncio.gather(*(claim(i, locked=False) for i in range(24)))
    assert await raw.llen("job:1:winners") > 1  # naive: several winners
    await raw.delete("job:1:owner", "job:1:winners")
    await asyncio.gather(*(claim(i, locked=True) for i in range(24)))
    assert await raw.llen("job:1:winners") == 1
    for backend in backends:
        await backend.close()
    await raw.aclose()


def _increment(url: str, rounds: int, locked: bool) -> None:
    raw = redis.Redis.from_url(url)
    locks = KeyedLock(RedisBackend.from_url(url))
    for _ in range(rounds):
        if locked:
            with locks.sync("counter", timeout=60):
                value = int(raw.get("counter") or 0)
                raw.set("counter", value + 1)
        else:
            value = int(raw.get("counter") or 0)
            time.sleep(0.0005)
            raw.set("counter", value + 1)


@pytest.mark.parametrize("locked", [True, False], ids=["keylock", "naive"])
def test_six_processes_increment_without_lost_updates(server: Server, locked: bool) -> None:
    procs = [ctx.Process(target=_increment, args=(server.url, 50, locked)) for _ in range(6)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    total = int(redis.Redis.from_url(server.url).get("counter") or 0)
    if locked:
        assert total == 300
    else:
        assert total < 300  # the naive GET-then-SET loses updates


async def test_batch_promotion_on_redis(server: Server) -> None:
    locks = KeyedLock(RedisBackend.from_url(server.url))
    for seed in range(30):
        batch = await _trial(locks, seed)
        assert _agrees(batch)
        assert batch.status == "failed"
    await locks.close()


def _paused_holder(url: str, events: object, results: object) -> None:
    locks = KeyedLock(RedisBackend.from_url(url, ttl=1.0))  # auto-renew on: stops with us
    raw = redis.Redis.from_url(url)
    lease = locks.acquire_sync("invoice:7")
    fenced_set_sync(raw, "invoice:7", lease.token, "from the first worker")
    results.put(lease.token)  # type: ignore[attr-defined]
    events.wait()  # type: ignore[attr-defined]  # the parent SIGSTOPs us here, then resumes us
    outcome = []
    try:
        fenced_set_sync(raw, "invoice:7", lease.token, "stale write after waking up")
        outcome.append("written")
    except StaleToken:
        outcome.append("StaleToken")
    try:
        lease.release_sync()
        outcome.append("released")
    except LeaseLost:
        outcome.append("LeaseLost")
    outcome.append("lost" if lease.lost else "not lost")
    results.put(outcome)  # type: ignore[attr-defined]


def test_lease_takeover_after_sigstop_is_fenced(server: Server) -> None:
    """Incident 5: a holder frozen (SIGSTOP) past its TTL; another worker takes over with a
    higher token and writes; the first wakes: its fenced write raises StaleToken and its
    release raises LeaseLost. Without fencing the stale write would land (the store shows)."""
    events = ctx.Event()
    results = ctx.Queue()
    child = ctx.Process(target=_paused_holder, args=(server.url, events, results))
    child.start()
    first_token = results.get(timeout=30)
    os.kill(child.pid, signal.SIGSTOP)  # type: ignore[arg-type]
    try:
        locks = KeyedLock(RedisBackend.from_url(server.url, ttl=5.0))
        raw = redis.Redis.from_url(server.url)
        lease = locks.acquire_sync("invoice:7", timeout=30)  # granted once the TTL runs out
        assert lease.token > first_token
        fenced_set_sync(raw, "invoice:7", lease.token, "from the second worker")
    finally:
        os.kill(child.pid, signal.SIGCONT)  # type: ignore[arg-type]
    events.set()  # (after SIGCONT: setting an Event waits for its sleepers to wake)
    assert results.get(timeout=30) == ["StaleToken", "LeaseLost", "lost"]
    child.join(30)
    assert raw.get("keylock:fenced:{invoice:7}") == b"from the second worker"
    lease.release_sync()
    locks.close_sync()


async def test_tokens_rise_after_a_restart_that_lost_all_data() -> None:
    with running_server() as own:
        locks = KeyedLock(RedisBackend.from_url(own.url))
        before = []
        for _ in range(5):
            lease = await locks.acquire("k")
            before.append(lease.token)
            await lease.release()
        await locks.close()
        own.restart()  # no persistence: every key, fence counters included, is gone
        assert redis.Redis.from_url(own.url).dbsize() == 0
        locks = KeyedLock(RedisBackend.from_url(own.url))
        lease = await locks.acquire("k")
        assert lease.token > max(before)
        await lease.release()
        await locks.close()


def _hold_and_die(url: str, ready: object) -> None:
    locks = KeyedLock(RedisBackend.from_url(url, ttl=1.0))
    locks.acquire_sync("crash")
    ready.set()  # type: ignore[attr-defined]
    time.sleep(600)


def test_a_waiter_wakes_promptly_when_the_holder_is_killed(server: Server) -> None:
    """The holder is SIGKILLed (no release message ever comes): the waiter wakes at the TTL's
    end, as the acquire script told it, not at its own 60 s timeout."""
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_and_die, args=(server.url, ready))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
    locks = KeyedLock(RedisBackend.from_url(server.url))
    started = time.monotonic()
    lease = locks.acquire_sync("crash", timeout=60)
    assert time.monotonic() - started < 30
    lease.release_sync()
    locks.close_sync()
    holder.join(10)


def _fetch_once(url: str, results: object) -> None:
    raw = redis.Redis.from_url(url)
    flight = SingleFlight(RedisBackend.from_url(url))

    def fetch() -> dict[str, int]:
        runs = raw.incr("runs")
        time.sleep(0.5)
        return {"value": 42, "run": int(runs)}

    results.put(flight.do_sync("user:1", fetch))  # type: ignore[attr-defined]


def test_single_flight_across_processes_runs_once(server: Server) -> None:
    results = ctx.Queue()
    procs = [ctx.Process(target=_fetch_once, args=(server.url, results)) for _ in range(5)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    assert outcomes == [{"value": 42, "run": 1}] * 5
    assert int(redis.Redis.from_url(server.url).get("runs") or 0) == 1


async def test_single_flight_errors_reach_remote_followers(server: Server) -> None:
    backends = [RedisBackend.from_url(server.url) for _ in range(2)]
    leader, follower = (SingleFlight(backend) for backend in backends)

    async def fail() -> None:
        await asyncio.sleep(0.3)
        raise ValueError("upstream said no")

    async def never() -> None:
        raise AssertionError("a follower must not run the work")

    first = asyncio.create_task(leader.do("k", fail))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(follower.do("k", never))
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, ValueError]
    assert [str(r) for r in results] == ["upstream said no"] * 2
    for backend in backends:
        await backend.close()


def _lead_and_die(url: str, started: object) -> None:
    flight = SingleFlight(RedisBackend.from_url(url, ttl=1.0))

    def slow() -> str:
        started.set()  # type: ignore[attr-defined]
        time.sleep(600)
        return "never"

    flight.do_sync("job", slow)


def test_single_flight_takes_over_when_the_leader_dies(server: Server) -> None:
    started = ctx.Event()
    leader = ctx.Process(target=_lead_and_die, args=(server.url, started))
    leader.start()
    assert started.wait(30)
    os.kill(leader.pid, signal.SIGKILL)  # type: ignore[arg-type]
    flight = SingleFlight(RedisBackend.from_url(server.url))
    assert flight.do_sync("job", lambda: "taken over") == "taken over"
    leader.join(10)


async def test_single_flight_followers_wait_without_polling(server: Server) -> None:
    """Followers on other clients queue for the leader's lease and read its result once, when
    it releases: over a 0.6 s flight each follower reads the result key exactly once (polling,
    as the first version did, read it a dozen times or more), and each gets the leader's
    result."""
    raw = redis.Redis.from_url(server.url)
    backends = [RedisBackend.from_url(server.url) for _ in range(5)]
    flights = [SingleFlight(backend) for backend in backends]
    reads = [0] * len(backends)
    for n, backend in enumerate(backends):
        client = backend._async()
        get = client.get

        async def counting(name: str, n: int = n, get=get) -> object:  # type: ignore[no-untyped-def]
            reads[n] += 1
            return await get(name)

        client.get = counting  # type: ignore[method-assign]
    started = asyncio.Event()

    async def work() -> int:
        started.set()
        await asyncio.sleep(0.6)
        return int(raw.incr("polled:runs"))

    async def never() -> int:
        raise AssertionError("a follower must not run the work")

    leader = asyncio.create_task(flights[0].do("polled", work))
    await started.wait()
    await asyncio.sleep(0.05)  # the leader holds its lease
    followers = [asyncio.create_task(flight.do("polled", never)) for flight in flights[1:]]
    results = await asyncio.gather(leader, *followers)
    assert results == [1] * 5
    assert reads == [0, 1, 1, 1, 1]
    for backend in backends:
        await backend.close()
