"""In-process workloads: keylock's MemoryBackend against a bare asyncio.Lock, a bare
threading.Lock, asyncio-keyed-lock, and the PyPI ``singleflight`` package, in one run."""

from __future__ import annotations

import asyncio
import gc
import threading
import tracemalloc
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from .. import KeyedLock, SingleFlight
from . import inproc, observability
from .harness import INSTALL, Row, Suite, cpu_clock, interleave, measure
from .progress import Step

__all__ = ["steps"]

AsyncFactory = Callable[[str], AbstractAsyncContextManager[object]]
_Do = Callable[[Callable[[], Awaitable[int]]], Awaitable[int]]  # a flight's do(fn)


def _peer_keyed_lock() -> Callable[[], AsyncFactory] | None:
    """A factory of asyncio-keyed-lock instances, or None when it is not installed."""
    try:
        from asyncio_keyed_lock import AsyncioKeyedLock
    except ImportError:
        return None
    return lambda: AsyncioKeyedLock()


def steps(suite: Suite) -> list[Step]:
    """The in-process workloads of *suite*'s mode (contention in :mod:`.inproc`, the cost of
    observing in :mod:`.observability`); their rows go to *suite*."""
    repeats = 3 if suite.quick else 7
    scale = 0.25 if suite.quick else 1.0  # the estimates: seconds on a 2-core VM
    found = [
        Step(
            "in-process: uncontended async acquire+release",
            8 * scale,
            lambda: _uncontended_async(suite, repeats),
        ),
        Step(
            "in-process: uncontended sync acquire+release",
            4 * scale,
            lambda: _uncontended_sync(suite, repeats),
        ),
    ]
    if suite.headline:
        return found + inproc.steps(suite)
    return [
        *found,
        Step("in-process: hot key, 100 tasks", 3 * scale, lambda: _hot_key(suite, repeats)),
        *inproc.steps(suite),
        Step(
            "in-process: 100,000 distinct keys",
            12 * scale,
            lambda: _distinct_keys(suite, 3 if suite.quick else 5),
        ),
        Step("in-process: single-flight", 6 * scale, lambda: _single_flight(suite, repeats)),
        Step("in-process: observability", 20 * scale, lambda: observability.run(suite)),
    ]


# ------------------------------------------------------------------ uncontended acquire+release


def _uncontended_async(suite: Suite, repeats: int) -> None:
    """One loop, one key: CPU time of the thread per acquire+release (see ``cpu_clock``)."""
    n = 50_000 if suite.quick else 200_000
    workload = "uncontended async acquire+release"

    def timed(make: Callable[[], AsyncFactory]) -> Callable[[], float]:
        def once() -> float:
            async def body() -> float:
                factory = make()
                start = cpu_clock()
                for _ in range(n):
                    async with factory("k"):
                        pass
                return (cpu_clock() - start) / n * 1e6

            return asyncio.run(body())

        return once

    def bare() -> AsyncFactory:
        lock = asyncio.Lock()
        return lambda key: lock

    subjects: list[tuple[str, Callable[[], AsyncFactory] | None]] = [
        ("asyncio.Lock (bare, one key)", bare),
        ("keylock KeyedLock()", lambda: KeyedLock()),
        ("asyncio-keyed-lock", _peer_keyed_lock()),
    ]
    figures = interleave(
        [(name, timed(make)) for name, make in subjects if make is not None], repeats=repeats
    )
    for name, make in subjects:
        if make is None:
            suite.say(f"{name}: not installed, skipped ({INSTALL})")
            continue
        values = figures[name]
        suite.add(
            Row.of(
                workload,
                name,
                "CPU us",
                values,
                notes="one loop only, no threads" if "asyncio" in name else "",
            )
        )


def _uncontended_sync(suite: Suite, repeats: int) -> None:
    n = 100_000 if suite.quick else 400_000
    workload = "uncontended sync acquire+release"
    locks = KeyedLock()
    bare = threading.Lock()

    def keylock_once() -> float:
        start = cpu_clock()
        for _ in range(n):
            with locks.sync("k"):
                pass
        return (cpu_clock() - start) / n * 1e6

    def bare_once() -> float:
        start = cpu_clock()
        for _ in range(n):
            with bare:
                pass
        return (cpu_clock() - start) / n * 1e6

    figures = interleave(
        [("threading.Lock (bare, one key)", bare_once), ("keylock", keylock_once)],
        repeats=repeats,
    )
    for name, values in figures.items():
        suite.add(
            Row.of(
                workload,
                "keylock KeyedLock().sync" if name == "keylock" else name,
                "CPU us",
                values,
            )
        )


# --------------------------------------------------------------------------------- hot key


def _hot_key(suite: Suite, repeats: int) -> None:
    tasks, rounds = 100, (20 if suite.quick else 60)
    workload = f"hot key, {tasks} tasks"

    async def contend(factory: AsyncFactory) -> tuple[float, int]:
        inside = 0
        violations = 0

        async def worker() -> None:
            nonlocal inside, violations
            for _ in range(rounds):
                async with factory("hot"):
                    inside += 1
                    if inside != 1:
                        violations += 1
                    await asyncio.sleep(0)
                    inside -= 1

        start = cpu_clock()
        await asyncio.gather(*(worker() for _ in range(tasks)))
        return tasks * rounds / (cpu_clock() - start), violations

    def bare() -> AsyncFactory:
        lock = asyncio.Lock()
        return lambda key: lock

    subjects: list[tuple[str, Callable[[], AsyncFactory] | None]] = [
        ("asyncio.Lock (bare, one key)", bare),
        ("keylock KeyedLock()", lambda: KeyedLock()),
        ("asyncio-keyed-lock", _peer_keyed_lock()),
    ]
    violations: dict[str, int] = {}

    def once(name: str, make: Callable[[], AsyncFactory]) -> float:
        rate, bad = asyncio.run(contend(make()))
        violations[name] = violations.get(name, 0) + bad
        return rate

    runs = [
        (name, lambda name=name, make=make: once(name, make))
        for name, make in subjects
        if make is not None
    ]
    for name, values in interleave(runs, repeats=repeats).items():
        suite.add(
            Row.of(
                workload,
                name,
                "hand-offs/s",
                values,
                higher_is_better=True,
                notes=f"{violations[name]} exclusion violations",
                extra={"violations": violations[name]},
            )
        )


# ---------------------------------------------------------------------------- many keys


def _distinct_keys(suite: Suite, repeats: int) -> None:
    n = 100_000
    locks = KeyedLock()

    async def churn(count: int, prefix: str) -> float:
        keys = [f"{prefix}:{i}" for i in range(count)]
        start = cpu_clock()
        for key in keys:
            async with locks(key):
                pass
        return (cpu_clock() - start) / count * 1e6

    median, low, high = measure(lambda: asyncio.run(churn(n, "k")), repeats=repeats)
    suite.add(
        Row(f"{n:,} distinct keys", "keylock KeyedLock()", "CPU us/op", median, low, high, repeats)
    )

    churned = 200_000

    async def retained() -> float:
        await churn(2_000, "warm")
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        await churn(churned, "churn")
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        return float(sum(stat.size_diff for stat in after.compare_to(before, "filename")))

    value = asyncio.run(retained())
    suite.add(
        Row(
            f"{churned:,} distinct keys churned",
            "keylock KeyedLock()",
            "bytes retained",
            value,
            value,
            value,
            1,
            notes=f"{len(locks.backend)} keys left held",  # type: ignore[arg-type]
        )
    )


# ---------------------------------------------------------------------------- single-flight


def _single_flight(suite: Suite, repeats: int) -> None:
    """10,000 callers of one key share one execution: CPU time per caller on the loop's thread.

    CPU time, not wall time less the work's sleep: a flight that starts the work's timer inside
    the first caller's step (the PyPI peer runs it inline) overlaps that sleep with the other
    callers' set-up, and the subtraction then credited it about 1 us per caller that it did not
    save. The loop's thread CPU time counts only what the callers cost (and is not inflated by
    other processes on a shared machine)."""
    callers = 1_000 if suite.quick else 10_000
    work_seconds = 0.01
    workload = f"single-flight, {callers:,} callers"

    async def coalesce(do: _Do) -> float:
        executions = 0

        async def fetch() -> int:
            nonlocal executions
            executions += 1
            await asyncio.sleep(work_seconds)
            return 42

        start = cpu_clock()
        results = await asyncio.gather(*(do(fetch) for _ in range(callers)))
        used = cpu_clock() - start
        if executions != 1 or results != [42] * callers:
            raise AssertionError(f"{executions} executions for {callers} callers")
        return used / callers * 1e6

    def keylock_do() -> _Do:
        flight = SingleFlight()
        return lambda fn: flight.do("user:1", fn)

    subjects: list[tuple[str, Callable[[], _Do]]] = [
        (_FLOOR, _floor_do),
        ("keylock SingleFlight()", keylock_do),
    ]
    try:
        from singleflight.asynchronous import SingleFlightAsync

        def peer_do() -> _Do:
            flight = SingleFlightAsync()
            return lambda fn: flight.call(fn, "user:1")

        subjects.append(("singleflight (PyPI)", peer_do))
    except ImportError:
        suite.say("singleflight (PyPI): not installed, skipped")
    runs = [(name, lambda make=make: asyncio.run(coalesce(make()))) for name, make in subjects]
    for name, values in interleave(runs, repeats=repeats).items():
        floor = name == _FLOOR
        suite.add(
            Row.of(
                workload,
                name,
                "CPU us/caller",
                values,
                reference=floor,
                notes="a task and a future per caller, no bookkeeping"
                if floor
                else "1 execution (checked)",
            )
        )


_FLOOR = "asyncio floor"


def _floor_do() -> _Do:
    """The least any asyncio single-flight can cost per caller: each caller is a task that
    awaits a future of its own, set by the one execution; no key, no cancellation handling."""
    waiters: list[asyncio.Future[int]] = []
    running: list[asyncio.Task[None]] = []  # held: the loop keeps only a weak reference

    async def do(fn: Callable[[], Awaitable[int]]) -> int:
        loop = asyncio.get_running_loop()
        if not running:

            async def settle() -> None:
                result = await fn()
                for waiter in waiters:
                    waiter.set_result(result)

            running.append(loop.create_task(settle()))
        waiter: asyncio.Future[int] = loop.create_future()
        waiters.append(waiter)
        return await waiter

    return do
