"""Argument checks at every entry point: one clear error naming the key, and nothing held after.

Each case runs twice: on a free key, and on a key another caller holds (a bad argument must be
refused before the caller joins the queue).
"""

from __future__ import annotations

import asyncio
import math

import pytest

import keylock
from keylock import InvalidKey, KeyedLock

TOO_LONG = "k" * (keylock.MAX_KEY_LENGTH + 1)
BAD_KEYS = ["", TOO_LONG, "nul\x00byte", 42, None, b"job:7", ("job", 7)]


def _assert_nothing_held(locks: KeyedLock, *keys: str) -> None:
    for key in keys:
        stats = locks.statistics(key)
        assert not stats.held, stats
        assert stats.waiting == 0, stats
    assert len(locks.backend) == 0  # type: ignore[arg-type]


def _assert_names_the_key(error: InvalidKey, key: object) -> None:
    assert isinstance(error, ValueError)
    assert isinstance(error, keylock.KeylockError)
    assert error.key == key
    message = str(error)
    if key == "":
        assert "empty" in message
    else:
        assert repr(key)[:30] in message
    if key == TOO_LONG:
        assert str(keylock.MAX_KEY_LENGTH) in message


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
async def test_bad_keys_are_invalid_key_at_every_entry_point(key: object) -> None:
    locks = KeyedLock()
    bad: str = key  # type: ignore[assignment]
    with pytest.raises(InvalidKey) as info:
        await locks.acquire(bad)
    _assert_names_the_key(info.value, key)
    with pytest.raises(InvalidKey):
        locks.acquire_sync(bad, timeout=1)
    with pytest.raises(InvalidKey):
        async with locks(bad, ttl=5):
            pytest.fail("entered the block")
    with pytest.raises(InvalidKey), locks.sync(bad):
        pytest.fail("entered the block")
    with pytest.raises(InvalidKey):
        locks.statistics(bad)
    _assert_nothing_held(locks, "k")


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
async def test_bad_keys_from_decorators(key: object) -> None:
    locks = KeyedLock()
    if isinstance(key, str):  # a fixed bad key is refused when decorating
        with pytest.raises(InvalidKey):
            locks.locked(key=key)

    @locks.locked(key=lambda: key)  # type: ignore[arg-type,return-value]
    async def handler() -> None:
        pytest.fail("ran without the lock")

    @locks.locked(key=lambda: key)  # type: ignore[arg-type,return-value]
    def sync_handler() -> None:
        pytest.fail("ran without the lock")

    with pytest.raises(InvalidKey):
        await handler()
    with pytest.raises(InvalidKey):
        sync_handler()
    _assert_nothing_held(locks, "k")


async def test_longest_key_is_accepted_and_str_subclasses_are_copied() -> None:
    locks = KeyedLock()
    longest = "k" * keylock.MAX_KEY_LENGTH
    async with locks(longest) as lease:
        assert lease.key == longest

    class Key(str):
        pass

    async with locks(Key("job:7"), timeout=1) as lease:
        assert type(lease.key) is str
        assert locks.statistics("job:7").held
    _assert_nothing_held(locks, "job:7")


@pytest.mark.parametrize("held", [False, True], ids=["free", "held"])
@pytest.mark.parametrize("timeout", [-1, -0.001, -math.inf, math.nan])
async def test_negative_or_nan_timeouts_are_value_errors(held: bool, timeout: float) -> None:
    locks = KeyedLock()
    holder = await locks.acquire("k") if held else None
    with pytest.raises(ValueError, match="timeout") as info:
        await locks.acquire("k", timeout=timeout)
    assert "'k'" in str(info.value)
    with pytest.raises(ValueError, match="timeout"):
        locks.acquire_sync("k", timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        async with locks("k", timeout=timeout):
            pytest.fail("entered the block")
    assert locks.statistics("k").waiting == 0
    if holder is not None:
        await holder.release()
    _assert_nothing_held(locks, "k")


@pytest.mark.parametrize("timeout", [True, False, "5", b"5", [1], 1j])
async def test_non_numeric_timeouts_are_type_errors(timeout: object) -> None:
    locks = KeyedLock()
    with pytest.raises(TypeError, match="timeout"):
        await locks.acquire("k", timeout=timeout)  # type: ignore[arg-type]
    block = locks.sync("k", timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout"), block:
        pytest.fail("entered the block")
    _assert_nothing_held(locks, "k")


async def test_infinite_timeout_waits_forever() -> None:
    locks = KeyedLock()
    lease = await locks.acquire("k", timeout=math.inf)
    waiter = asyncio.create_task(locks.acquire("k", timeout=math.inf))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    assert locks.statistics("k").waiting == 1
    await lease.release()
    second = await waiter
    assert second.token > lease.token
    await second.release()
    _assert_nothing_held(locks, "k")


async def test_zero_and_positive_timeouts_are_accepted() -> None:
    locks = KeyedLock()
    async with locks("k", timeout=0), locks("j", timeout=2):
        with pytest.raises(keylock.LockTimeout):
            await locks.acquire("k", timeout=0)
    _assert_nothing_held(locks, "k", "j")


@pytest.mark.parametrize("held", [False, True], ids=["free", "held"])
@pytest.mark.parametrize("ttl", [0, 0.0, -1, math.nan, math.inf, 0.0001])
async def test_bad_ttls_are_value_errors(held: bool, ttl: float) -> None:
    locks = KeyedLock()
    holder = await locks.acquire("k") if held else None
    with pytest.raises(ValueError, match="ttl") as info:
        await locks.acquire("k", ttl=ttl)
    assert "'k'" in str(info.value)
    with pytest.raises(ValueError, match="ttl"):
        locks.acquire_sync("k", ttl=ttl)
    with pytest.raises(ValueError, match="ttl"), locks.sync("k", ttl=ttl, timeout=0):
        pytest.fail("entered the block")
    assert locks.statistics("k").waiting == 0
    if holder is not None:
        await holder.release()
    _assert_nothing_held(locks, "k")


@pytest.mark.parametrize("ttl", [True, "5", [5]])
def test_non_numeric_ttls_are_type_errors(ttl: object) -> None:
    locks = KeyedLock()
    with pytest.raises(TypeError, match="ttl"):
        locks.acquire_sync("k", ttl=ttl)  # type: ignore[arg-type]
    _assert_nothing_held(locks, "k")


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf])
async def test_bad_extend_ttls_leave_the_lease_as_it_was(ttl: float) -> None:
    locks = KeyedLock()
    lease = await locks.acquire("k", ttl=5)
    expires_at = lease.expires_at
    with pytest.raises(ValueError, match="ttl"):
        await lease.extend(ttl)
    with pytest.raises(ValueError, match="ttl"):
        lease.extend_sync(ttl)
    assert lease.expires_at == expires_at
    assert not lease.lost
    await lease.release()
    _assert_nothing_held(locks, "k")


async def test_extend_without_any_ttl_is_a_value_error() -> None:
    locks = KeyedLock()
    async with locks("k") as lease:
        with pytest.raises(ValueError, match="no TTL"):
            await lease.extend()
    _assert_nothing_held(locks, "k")


def test_bad_constructor_arguments() -> None:
    with pytest.raises(TypeError, match="backend"):
        KeyedLock("redis://localhost")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="namespace"):
        KeyedLock(namespace=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="locked"):
        KeyedLock().locked(key=3)  # type: ignore[call-overload]
