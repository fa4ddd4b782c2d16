"""What listening costs: uncontended acquire+release with no observer, with a do-nothing
``Observer()`` and with ``observer=keylock.COUNTERS``, interleaved in one run (CPU time of the
thread, as the other in-process rows: steadier than wall time on a shared machine)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .. import COUNTERS, KeyedLock, Observer
from .harness import Row, Suite, cpu_clock

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["run"]

_NONE = "keylock KeyedLock() (no observer)"
_SUBJECTS: list[tuple[str, Callable[[], KeyedLock]]] = [
    (_NONE, lambda: KeyedLock()),
    ("keylock KeyedLock(observer=Observer())", lambda: KeyedLock(observer=Observer())),
    ("keylock KeyedLock(observer=keylock.COUNTERS)", lambda: KeyedLock(observer=COUNTERS)),
]


def _async_us(locks: KeyedLock, n: int) -> float:
    async def body() -> float:
        start = cpu_clock()
        for _ in range(n):
            async with locks("bench:observed"):
                pass
        return (cpu_clock() - start) / n * 1e6

    return asyncio.run(body())


def _sync_us(locks: KeyedLock, n: int) -> float:
    start = cpu_clock()
    for _ in range(n):
        with locks.sync("bench:observed"):
            pass
    return (cpu_clock() - start) / n * 1e6


def run(suite: Suite) -> None:
    """Both flavours; each observed row notes its cost over the unobserved one."""
    repeats = 3 if suite.quick else 7
    n = 50_000 if suite.quick else 200_000
    for flavour, timed in (("async", _async_us), ("sync", _sync_us)):
        workload = f"observability: uncontended {flavour} acquire+release"
        figures: dict[str, list[float]] = {name: [] for name, _ in _SUBJECTS}
        for _ in range(repeats):  # interleaved: drift hits every subject alike
            for name, make in _SUBJECTS:
                figures[name].append(timed(make(), n))
        unobserved = Row.of(workload, _NONE, "CPU us", figures[_NONE])
        for name, values in figures.items():
            row = Row.of(workload, name, "CPU us", values, baseline=_NONE)
            if name != _NONE:
                delta = row.median - unobserved.median
                row.notes = (
                    f"{delta:+.3f} us ({delta / unobserved.median:+.0%}) per acquire+release"
                )
                row.extra["delta_us"] = delta
            else:
                row.notes = "runs no observer code at all"
            suite.add(row)
    COUNTERS.reset()  # leave no benchmark traffic in the process-wide counters
