"""The suite's concurrency checks catch the naive lock users write by hand.

``_NaiveBackend`` is the read -> decide -> write pattern of DESIGN.md: it checks whether the
key is held, crosses an ``await`` (a network hop), then marks it held. Run through the very
workloads of ``test_exclusion`` and ``test_tokens``, it must be caught: two holders at once, lost
updates. If these ever pass, the checks have gone blind.
"""

from __future__ import annotations

import asyncio
import itertools
from types import FrameType

from keylock import KeyedLock
from keylock.backends.base import Backend, Grant, KeyStatistics, Waiter

from ._driver import Driver
from .test_exclusion import _contend, _Section


class _NaiveBackend(Backend):
    nonblocking_step = False

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.tokens = itertools.count(1)

    async def acquire(
        self,
        key: str,
        owner: bytes,
        *,
        timeout: float | None,
        ttl: float | None,
        holder: FrameType | None = None,
    ) -> Grant:
        while key in self.held:  # read + decide ...
            await asyncio.sleep(0)
        token = next(self.tokens)
        await asyncio.sleep(0)  # ... a hop to the store ...
        self.held[key] = token  # ... write: another caller may have passed the check meanwhile
        return Grant(token, None)

    def _try_acquire(
        self, key: str, owner: bytes, ttl: float | None, waiter: Waiter | None
    ) -> Grant | None:
        return None  # always go through acquire()

    def _withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        return None

    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        self.held.pop(key, None)

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> float:
        return 0.0

    def statistics(self, key: str) -> KeyStatistics:
        return KeyStatistics(key, held=key in self.held, token=None, owner=None, waiting=0)


async def test_exclusion_workload_catches_the_naive_lock() -> None:
    backend = _NaiveBackend()
    section = _Section()
    await _contend(Driver(), [KeyedLock(backend) for _ in range(8)], section, rounds=15)
    assert section.max_inside > 1  # two holders at once
    assert section.counter < 8 * 15  # lost updates
