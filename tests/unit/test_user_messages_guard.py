"""What ``stale_guard`` says of a ``snapshot=`` or ``expected=`` function that does not fit the
guarded call: both functions and their parameters, as for ``key=`` (never a default's value)."""

from __future__ import annotations

import asyncio

import pytest

import keylock
from keylock import KeyedLock


def test_a_snapshot_or_expected_function_that_does_not_fit_the_call_names_both() -> None:
    """``stale_guard(snapshot=..., expected=...)`` whose function cannot take the handler's
    arguments raises a TypeError naming the role ("snapshot"/"expected"), both functions,
    their parameters (never a default's value) and the fix, sync and async (a sync and an
    async snapshot); a TypeError raised inside the function's own body is left as it is.
    Fails on the old code: Python's bare "<lambda>() takes 1 positional argument but 2 were
    given"."""
    locks = KeyedLock()

    @keylock.stale_guard(locks, key=lambda order, carrier: f"order:{order}", snapshot=lambda o: o)
    def ship(order: int, carrier: str, password: str = "s3cret-pw") -> str:
        return carrier

    async def state(order: int) -> int:
        return order

    @keylock.stale_guard(locks, key=lambda order, amount: f"order:{order}", snapshot=state)
    async def bill(order: int, amount: int) -> int:
        return amount

    @keylock.stale_guard(
        locks,
        key=lambda order, status: f"order:{order}",
        expected=lambda order: order,
        snapshot=lambda order, status: status,
    )
    def settle(order: int, status: str) -> str:
        return status

    def broken(order: int, carrier: str) -> str:
        return "order:" + order  # type: ignore[operator]  # its own TypeError

    @keylock.stale_guard(locks, key=lambda order, carrier: f"order:{order}", snapshot=broken)
    def other(order: int, carrier: str) -> str:
        return carrier

    with pytest.raises(TypeError) as sync_misfit:
        ship(7, "post")
    with pytest.raises(TypeError) as async_misfit:
        asyncio.run(bill(7, 10))
    with pytest.raises(TypeError) as expected_misfit:
        settle(7, "paid")
    shipped = str(sync_misfit.value)
    assert shipped.startswith(f"@stale_guard(snapshot=...) of {__name__}."), shipped
    assert "ship: the snapshot function " in shipped
    assert "<lambda>(o) cannot take this call's arguments (2 positional arguments: " in shipped
    assert "every call of ship(order, carrier, password=...), so give it matching" in shipped
    assert "s3cret" not in shipped
    billed = str(async_misfit.value)
    assert billed.startswith("@stale_guard(snapshot=...) of "), billed
    assert ".state(order) cannot take this call's arguments (2 positional arguments: " in billed
    assert "every call of bill(order, amount)" in billed
    settled = str(expected_misfit.value)
    assert settled.startswith("@stale_guard(expected=...) of "), settled
    assert "settle: the expected function " in settled
    assert "every call of settle(order, status)" in settled
    with pytest.raises(TypeError) as own:
        other(7, "post")
    assert "can only concatenate str" in str(own.value)
    assert "@stale_guard" not in str(own.value)
