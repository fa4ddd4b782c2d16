"""SingleFlight: one execution per key for concurrent callers; cancellation and errors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from keylock import InvalidKey, SingleFlight


async def test_concurrent_callers_share_one_execution() -> None:
    flight = SingleFlight()
    runs = 0

    async def fetch(user: int) -> dict[str, int]:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.01)
        return {"id": user}

    results = await asyncio.gather(*(flight.do("user:1", fetch, 1) for _ in range(50)))
    assert runs == 1
    assert results == [{"id": 1}] * 50
    assert len(flight) == 0


async def test_leader_cancelled_while_a_hundred_followers_wait() -> None:
    flight = SingleFlight()
    runs = 0

    async def work() -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        return "done"

    leader = asyncio.create_task(flight.do("k", work))
    await asyncio.sleep(0)
    followers = [asyncio.create_task(flight.do("k", work)) for _ in range(100)]
    await asyncio.sleep(0.01)
    leader.cancel()
    results = await asyncio.gather(*followers)
    assert results == ["done"] * 100
    assert leader.cancelled()
    assert runs == 1


async def test_everyone_cancelled_cancels_the_work_then_a_newcomer_runs_fresh() -> None:
    flight = SingleFlight()
    started = 0
    saw_cancel = 0

    async def work() -> int:
        nonlocal started, saw_cancel
        started += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            saw_cancel += 1
            raise
        return started

    callers = [asyncio.create_task(flight.do("k", work)) for _ in range(10)]
    await asyncio.sleep(0.01)
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    await asyncio.sleep(0)
    assert saw_cancel == 1
    assert len(flight) == 0

    async def quick() -> str:
        return "fresh"

    assert await flight.do("k", quick) == "fresh"


async def test_leader_error_reaches_fifty_followers_each_its_own_copy() -> None:
    flight = SingleFlight()

    class Boom(Exception):
        pass

    async def work() -> None:
        await asyncio.sleep(0.01)
        raise Boom("backend down")

    results = await asyncio.gather(
        *(flight.do("k", work) for _ in range(51)), return_exceptions=True
    )
    assert all(isinstance(r, Boom) and str(r) == "backend down" for r in results)
    assert len({id(r) for r in results}) == 51  # distinct instances: no shared traceback


async def test_nothing_is_cached_after_completion() -> None:
    flight = SingleFlight()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await flight.do("k", work) == 1
    assert await flight.do("k", work) == 2


async def test_forget_starts_a_fresh_run_for_newcomers() -> None:
    flight = SingleFlight()
    gate = asyncio.Event()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        mine = runs
        await gate.wait()
        return mine

    first = asyncio.create_task(flight.do("k", work))
    await asyncio.sleep(0)
    flight.forget("k")
    second = asyncio.create_task(flight.do("k", work))
    await asyncio.sleep(0)
    gate.set()
    assert (await first, await second) == (1, 2)


def test_do_sync_shares_one_execution_across_threads() -> None:
    flight = SingleFlight()
    runs = 0
    barrier = threading.Barrier(8)
    results: list[object] = []

    def work() -> str:
        nonlocal runs
        runs += 1
        time.sleep(0.05)
        return "v"

    def call() -> None:
        barrier.wait()
        results.append(flight.do_sync("k", work))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert runs == 1
    assert results == ["v"] * 8


def test_do_sync_errors_reach_every_thread() -> None:
    flight = SingleFlight()
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def work() -> None:
        time.sleep(0.05)
        raise ValueError("nope")

    def call() -> None:
        barrier.wait()
        try:
            flight.do_sync("k", work)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(errors) == 4
    assert len({id(e) for e in errors}) == 4


async def test_invalid_key() -> None:
    async def work() -> None:
        return None

    with pytest.raises(InvalidKey):
        await SingleFlight().do("", work)
