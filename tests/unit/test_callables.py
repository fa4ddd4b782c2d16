"""Async callables that are not a plain ``async def`` get the async wrapper (row 2, adv_21)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import pytest

from keylock import KeyedLock, stale_guard
from keylock._callables import is_async_callable


def logged(fn: Callable[..., object]) -> Callable[..., object]:  # type: ignore[explicit-any]
    """An ordinary sync-style decorator (as a simple @log or @retry is written)."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        return fn(*args, **kwargs)

    return wrapper


class Peak:
    """Counts bodies running at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.peak = 0

    async def body(self, *args: object) -> None:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        await asyncio.sleep(0.005)
        self.inside -= 1


class Handler:
    def __init__(self) -> None:
        self.peak = Peak()

    async def __call__(self, agent: int) -> None:
        await self.peak.body()


async def _plain(agent: int) -> None:
    return None


class SyncCall:
    def __call__(self) -> int:
        return 1


def test_is_async_callable_sees_through_partials_objects_and_plain_decorators() -> None:
    assert is_async_callable(_plain)
    assert is_async_callable(functools.partial(_plain, 1))
    assert is_async_callable(functools.partial(functools.partial(_plain), 1))
    assert is_async_callable(Handler())
    assert is_async_callable(Handler().__call__)
    assert is_async_callable(logged(_plain))
    assert is_async_callable(logged(logged(_plain)))
    assert is_async_callable(functools.partial(logged(_plain), 1))
    assert not is_async_callable(len)
    assert not is_async_callable(lambda: 1)
    assert not is_async_callable(SyncCall())
    assert not is_async_callable(Handler)  # a class: calling it builds an instance
    assert not is_async_callable(logged(lambda: 1))
    assert not is_async_callable(functools.partial(print, 1))


def _cases() -> list[tuple[str, Callable[[Peak], Callable[[int], Awaitable[None]]]]]:
    def object_with_async_call(peak: Peak) -> Callable[[int], Awaitable[None]]:
        handler = Handler()
        handler.peak = peak
        return handler

    def partial_of_async(peak: Peak) -> Callable[[int], Awaitable[None]]:
        async def body(prefix: str, agent: int) -> None:
            await peak.body()

        return functools.partial(body, "x")

    def behind_plain_decorator(peak: Peak) -> Callable[[int], Awaitable[None]]:
        async def body(agent: int) -> None:
            await peak.body()

        return logged(body)  # type: ignore[return-value]

    return [
        ("async __call__", object_with_async_call),
        ("partial", partial_of_async),
        ("plain decorator", behind_plain_decorator),
    ]


@pytest.mark.parametrize(("name", "make"), _cases(), ids=[name for name, _ in _cases()])
async def test_async_callables_run_under_the_lock(
    name: str, make: Callable[[Peak], Callable[[int], Awaitable[None]]]
) -> None:
    """Row 2 (adv_21): on the old code stale_guard gave these the sync wrapper: the lock was
    held around the creation of the coroutine only, and 10 bodies ran at once (peak 10)."""
    locks = KeyedLock()
    peak = Peak()
    guarded = stale_guard(locks, key=lambda agent: f"agent:{agent}", snapshot=lambda a: 1)(
        make(peak)
    )
    await asyncio.gather(*(guarded(42) for _ in range(10)))  # type: ignore[misc]
    assert peak.peak == 1
    unguarded = stale_guard(locks, key=lambda agent: f"agent:{agent}")(make(peak))
    await asyncio.gather(*(unguarded(42) for _ in range(10)))  # type: ignore[misc]
    assert peak.peak == 1


def test_a_plain_function_returning_a_coroutine_is_refused_inside_the_lock() -> None:
    """What cannot be classified (a plain function that returns a coroutine) is refused with a
    TypeError naming it, the coroutine closed unawaited (no "never awaited" warning: warnings
    are errors here) and its body never run. On the old code the call returned the coroutine
    after the lock was released (the body then ran unlocked)."""
    locks = KeyedLock()
    ran: list[int] = []

    async def body() -> None:
        ran.append(1)

    def sneaky(agent: int) -> object:  # no __wrapped__: nothing to see through
        return body()

    for guard in (
        stale_guard(locks, key=lambda agent: f"agent:{agent}"),
        stale_guard(locks, key=lambda agent: f"agent:{agent}", snapshot=lambda agent: 1),
    ):
        guarded = guard(sneaky)
        with pytest.raises(TypeError, match=r"sneaky.*async def"):
            guarded(1)
    assert ran == []
    assert len(locks.backend) == 0  # type: ignore[arg-type]
