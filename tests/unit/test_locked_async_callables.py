"""``@locked`` holds the lock for the whole body of anything whose call is awaitable.

Row 2 of the hostile review (adv_21): an object with ``async def __call__`` or an ``async def``
behind a plain decorator got the sync wrapper, which released the lock before the body ran;
with the old ``inspect.iscoroutinefunction`` check the first saw 10 bodies at once and the
second ran its body outside the lock (a ``functools.partial`` was already seen through).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import pytest

from keylock import KeyedLock


class _Body:
    def __init__(self) -> None:
        self.inside = 0
        self.peak = 0

    async def __call__(self, i: int) -> int:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        await asyncio.sleep(0.001)
        self.inside -= 1
        return i


async def test_an_async_dunder_call_object_is_held_for_its_whole_body() -> None:
    locks = KeyedLock()
    body = _Body()
    guarded = locks.locked(body, key="k")
    assert await asyncio.gather(*(guarded(i) for i in range(10))) == list(range(10))
    assert body.peak == 1


def _plain_decorator(fn: Callable[[int], Awaitable[int]]) -> Callable[[int], Awaitable[int]]:
    def wrapper(i: int) -> Awaitable[int]:  # not async def, no functools.wraps
        return fn(i)

    return wrapper


async def test_an_async_def_behind_a_plain_decorator_is_refused_not_run_unlocked() -> None:
    locks = KeyedLock()
    body = _Body()
    guarded = locks.locked(_plain_decorator(body), key="k")
    with pytest.raises(TypeError, match="async def"):
        guarded(1)
    assert body.peak == 0  # the body never ran outside the lock
    assert not locks.statistics("k").held  # and nothing is left locked


async def test_a_partial_of_an_async_function_is_held() -> None:
    locks = KeyedLock()
    body = _Body()
    guarded = locks.locked(functools.partial(body.__call__), key="k")
    await asyncio.gather(*(guarded(i) for i in range(5)))
    assert body.peak == 1
