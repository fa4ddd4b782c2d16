"""The error hierarchy of DESIGN.md: one base, builtin bases where they apply, ``.key``, pickle."""

from __future__ import annotations

import asyncio
import copy
import pickle

import pytest

import keylock
from keylock import (
    BackendUnavailable,
    InvalidKey,
    KeyedLock,
    KeylockError,
    LeaseLost,
    LockTimeout,
    StaleToken,
    Superseded,
)

ERRORS = [LockTimeout, LeaseLost, StaleToken, Superseded, InvalidKey, BackendUnavailable]


def test_hierarchy() -> None:
    assert issubclass(KeylockError, Exception)
    for cls in ERRORS:
        assert issubclass(cls, KeylockError), cls
    assert issubclass(LockTimeout, TimeoutError)
    assert issubclass(InvalidKey, ValueError)
    # only those two borrow a builtin meaning
    for cls in (LeaseLost, StaleToken, Superseded, BackendUnavailable):
        assert not issubclass(cls, TimeoutError | ValueError | RuntimeError), cls
    # distinct kinds: catching one never catches another
    for a in ERRORS:
        for b in ERRORS:
            assert issubclass(a, b) == (a is b), (a, b)


def test_the_module_docstring_draws_the_tree() -> None:
    tree = keylock.errors.__doc__
    assert tree is not None
    for cls in [KeylockError, *ERRORS]:
        assert cls.__name__ in tree


@pytest.mark.parametrize("cls", [KeylockError, *ERRORS], ids=lambda c: c.__name__)
def test_key_attribute(cls: type[KeylockError]) -> None:
    error = cls("lock 'job:7' was not granted", key="job:7")
    assert error.key == "job:7"
    assert str(error) == "lock 'job:7' was not granted"
    assert cls("no key").key is None
    with pytest.raises(KeylockError) as info:
        raise error
    assert info.value is error


@pytest.mark.parametrize("cls", [KeylockError, *ERRORS], ids=lambda c: c.__name__)
@pytest.mark.parametrize("key", ["job:7", None, 42, b"raw"], ids=repr)
def test_pickle_round_trip_keeps_type_message_and_key(cls: type[KeylockError], key: object) -> None:
    error = cls(f"message naming {key!r}", key=key)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        clone = pickle.loads(pickle.dumps(error, protocol))
        assert type(clone) is cls
        assert str(clone) == str(error)
        assert clone.args == error.args
        assert clone.key == key
    clone = copy.copy(error)
    assert (type(clone), str(clone), clone.key) == (cls, str(error), key)


async def test_raised_errors_carry_the_key_and_say_what_to_do() -> None:
    locks = KeyedLock()
    async with locks("job:7"):
        with pytest.raises(LockTimeout) as timeout:
            await locks.acquire("job:7", timeout=0)
    assert timeout.value.key == "job:7"
    assert "'job:7'" in str(timeout.value)
    assert "timeout" in str(timeout.value)

    lease = await locks.acquire("job:8", ttl=0.01)
    await asyncio.sleep(0.05)
    with pytest.raises(LeaseLost) as lost:
        await lease.release()
    assert lost.value.key == "job:8"
    assert "'job:8'" in str(lost.value)
    assert "reconcile" in str(lost.value)

    with pytest.raises(InvalidKey) as invalid:
        await locks.acquire("")
    assert invalid.value.key == ""

    errors = [timeout.value, lost.value, invalid.value]
    for error in errors:  # errors raised in earnest pickle too (e.g. across a process pool)
        clone = pickle.loads(pickle.dumps(error))
        assert (type(clone), str(clone), clone.key) == (type(error), str(error), error.key)


def test_a_key_of_the_wrong_type_is_named_in_plain_english() -> None:
    """Issue 16, finding 9: the message read "lock key 42 is a int"."""
    from keylock import InvalidKey, KeyedLock

    for key, kind in ((42, "int"), (None, "NoneType"), (b"x", "bytes")):
        with pytest.raises(InvalidKey) as info:
            KeyedLock().statistics(key)  # type: ignore[arg-type]
        assert f"has type {kind}, not str" in str(info.value)
        assert " is a " not in str(info.value)
