"""Uncontended acquire+release measured in round trips of the server's cheapest command (a
Redis PING, a Postgres ``SELECT 1``): each operation is timed beside one such round trip sent
right after it, because a loopback round trip on a VM swings between ~35 and ~130 us from one
second to the next; the rows give each subject's median ratio over interleaved runs."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from .harness import Row, Suite

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["Pair", "add_rows", "paired", "paired_async"]

Pair = tuple[float, float]  # (us per op, us per round trip sent right after it)


def paired(op: Callable[[], object], ping: Callable[[], object], n: int, budget: float) -> Pair:
    """Mean us of *op* and of a round trip sent right after each one, over up to *n* pairs
    (slow peers stop at *budget* seconds, after 5 pairs at least)."""
    op_s = ping_s = 0.0
    done = 0
    deadline = time.perf_counter() + budget
    while done < n and (done < 5 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        op()
        t1 = time.perf_counter()
        ping()
        op_s += t1 - t0
        ping_s += time.perf_counter() - t1
        done += 1
    return op_s / done * 1e6, ping_s / done * 1e6


async def paired_async(
    op: Callable[[], Awaitable[object]], ping: Callable[[], Awaitable[object]], n: int
) -> Pair:
    """:func:`paired` on an event loop."""
    op_s = ping_s = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        await op()
        t1 = time.perf_counter()
        await ping()
        op_s += t1 - t0
        ping_s += time.perf_counter() - t1
    return op_s / n * 1e6, ping_s / n * 1e6


def add_rows(
    suite: Suite, workload: str, reference: str, unit: str, figures: dict[str, list[Pair]]
) -> None:
    """The round trip itself (a reference row) and each subject in round trips, in *suite*."""
    pings = [p for pairs in figures.values() for _, p in pairs]
    if not pings:
        return
    suite.add(
        Row.of(
            workload,
            reference,
            unit,
            [1.0] * len(pings),
            reference=True,
            notes=f"{statistics.median(pings):.0f} us (range {min(pings):.0f}-"
            f"{max(pings):.0f} us in this run)",
        )
    )
    for name, pairs in figures.items():
        us = statistics.median(op for op, _ in pairs)
        suite.add(
            Row.of(
                workload,
                name,
                unit,
                [op / ping for op, ping in pairs],
                notes=f"{us:.0f} us",
                extra={"us": us},
            )
        )
