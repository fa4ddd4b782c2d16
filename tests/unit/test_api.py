"""Front-door checks: key/timeout/ttl validation, errors, leases, the decorator, exports."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import pickle
import subprocess
import sys

import pytest

import keylock
from keylock import (
    BackendUnavailable,
    InvalidKey,
    KeyedLock,
    KeylockError,
    Lease,
    LeaseLost,
    LockTimeout,
    SingleFlight,
    StaleToken,
    Superseded,
)
from keylock.backends import Backend

BAD_KEYS = ["", "x" * (keylock.MAX_KEY_LENGTH + 1), "nul\x00byte", 42, None, b"bytes", ("t",)]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
async def test_bad_keys_raise_invalid_key_and_hold_nothing(key: object) -> None:
    locks = KeyedLock()
    with pytest.raises(InvalidKey) as info:
        await locks.acquire(key)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert info.value.key == key
    with pytest.raises(InvalidKey), locks.sync(key):  # type: ignore[arg-type]
        pass
    assert len(locks.backend) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, -0.001, math.nan])
async def test_bad_timeouts_are_value_errors(timeout: float) -> None:
    locks = KeyedLock()
    with pytest.raises(ValueError, match="timeout"):
        await locks.acquire("k", timeout=timeout)
    assert len(locks.backend) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [True, "5", [1]])
def test_non_numeric_timeouts_are_type_errors(timeout: object) -> None:
    with pytest.raises(TypeError):
        KeyedLock().acquire_sync("k", timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf])
def test_bad_ttls_are_value_errors(ttl: float) -> None:
    locks = KeyedLock()
    with pytest.raises(ValueError, match="ttl"):
        locks.acquire_sync("k", ttl=ttl)
    assert len(locks.backend) == 0  # type: ignore[arg-type]


async def test_infinite_timeout_waits_forever() -> None:
    locks = KeyedLock()
    lease = await locks.acquire("k", timeout=math.inf)
    await lease.release()


def test_error_hierarchy_and_pickling() -> None:
    assert issubclass(LockTimeout, TimeoutError)
    assert issubclass(InvalidKey, ValueError)
    for cls in (LockTimeout, LeaseLost, StaleToken, Superseded, InvalidKey, BackendUnavailable):
        assert issubclass(cls, KeylockError)
        error = cls("message naming k", key="k")
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is cls
        assert str(copy) == "message naming k"
        assert copy.key == "k"


async def test_lease_lifecycle() -> None:
    locks = KeyedLock()
    lease = await locks.acquire("life", ttl=5)
    assert isinstance(lease, Lease)
    assert len(lease.owner) == 16
    assert lease.owner == lease.owner  # stable once minted
    assert not lease.lost
    before = lease.expires_at
    await lease.extend(60)
    assert lease.expires_at is not None
    assert before is not None
    assert lease.expires_at > before
    await lease.release()
    assert lease.released
    with pytest.raises(RuntimeError):
        await lease.release()
    with pytest.raises(RuntimeError):
        await lease.extend(5)


async def test_a_block_is_entered_once() -> None:
    locks = KeyedLock()
    block = locks("once")
    async with block:
        pass
    with pytest.raises(RuntimeError, match="already entered"):
        async with block:
            pass


def test_an_async_block_exits_the_same_way_on_any_loop_and_through_exit_stacks() -> None:
    """The uncontended ``__aexit__`` returns an awaitable that is already done (no coroutine):
    it must behave as a coroutine would, on every loop, under ``AsyncExitStack``, with the
    body's exception propagated and a second exit refused."""
    locks = KeyedLock()

    async def use() -> None:
        async with contextlib.AsyncExitStack() as stack:
            lease = await stack.enter_async_context(locks("k"))
            assert locks.statistics("k").held
        assert lease.released
        assert not locks.statistics("k").held
        with pytest.raises(KeyError, match="body"):
            async with locks("k"):
                raise KeyError("body")
        assert not locks.statistics("k").held
        lease = await locks("k").__aenter__()
        assert await lease.__aexit__(None, None, None) is None
        with pytest.raises(RuntimeError, match="already released"):
            await lease.__aexit__(None, None, None)

    for _ in range(3):  # a new loop each time: the done awaitable belongs to none of them
        asyncio.run(use())


async def test_body_error_with_lost_lease_keeps_the_body_error() -> None:
    locks = KeyedLock()

    async def body_fails_after_expiry() -> None:
        async with locks("k", ttl=0.05):
            await asyncio.sleep(0.1)
            raise KeyError("body")

    with pytest.raises(KeyError) as info:
        await body_fails_after_expiry()
    assert any("lost" in note for note in getattr(info.value, "__notes__", []))
    with pytest.raises(LeaseLost):  # and with no body error, the loss itself is raised
        async with locks("k", ttl=0.05):
            await asyncio.sleep(0.1)


async def test_decorator_on_async_and_sync_functions() -> None:
    locks = KeyedLock()
    inside = 0
    worst = 0

    @locks.locked(key=lambda agent_id, *_: f"agent:{agent_id}")
    async def handle(agent_id: int, event: str) -> str:
        """Handle one event."""
        nonlocal inside, worst
        inside += 1
        worst = max(worst, inside)
        await asyncio.sleep(0.001)
        inside -= 1
        return event

    @locks.locked(key="fixed")
    def sync_handle(x: int) -> int:
        return x * 2

    assert await asyncio.gather(*(handle(1, str(i)) for i in range(10))) == [
        str(i) for i in range(10)
    ]
    assert worst == 1
    assert handle.__name__ == "handle"
    assert handle.__doc__ == "Handle one event."
    assert inspect.iscoroutinefunction(handle)
    assert sync_handle(21) == 42
    with pytest.raises(TypeError):
        locks.locked(key=3)  # type: ignore[call-overload]


def test_exports_are_pinned() -> None:
    assert sorted(keylock.__all__) == sorted(
        [
            "BackendUnavailable",
            "COUNTERS",
            "Counters",
            "InvalidKey",
            "KeyStatistics",
            "KeyedLock",
            "KeyedRWLock",
            "KeyedSemaphore",
            "KeylockError",
            "Lease",
            "LeaseLost",
            "LimitMismatch",
            "LockTimeout",
            "MAX_KEY_LENGTH",
            "Observer",
            "PrefixStats",
            "SUPERSEDED",
            "SingleFlight",
            "StaleToken",
            "Superseded",
            "stale_guard",
            "stats",
        ]
    )
    for name in ("KeyedLock", "Lease", "SingleFlight", "LockTimeout", "stale_guard"):
        assert getattr(keylock, name).__module__ == "keylock"


def test_import_keylock_stays_light() -> None:
    code = (
        "import sys, keylock, keylock.backends; "
        "assert 'redis' not in sys.modules, 'redis'; "
        "assert 'portalocker' not in sys.modules, 'portalocker'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("async_fn", "sync_fn"),
    [
        (Lease.extend, Lease.extend_sync),
        (Lease.release, Lease.release_sync),
        (KeyedLock.acquire, KeyedLock.acquire_sync),
        (KeyedLock.close, KeyedLock.close_sync),
        (SingleFlight.do, SingleFlight.do_sync),
        (Backend.acquire, Backend.acquire_sync),
        (Backend.release, Backend.release_sync),
        (Backend.extend, Backend.extend_sync),
    ],
)
def test_sync_twins_take_the_same_parameters(async_fn: object, sync_fn: object) -> None:
    """STYLE rule 6: a drifted twin (redis-py's sleep= on one side only) fails here. Names,
    kinds and defaults must match (annotations differ only where one side takes a coroutine
    function and the other a plain one)."""

    def shape(fn: object) -> list[tuple[str, object, object]]:
        parameters = inspect.signature(fn).parameters.values()  # type: ignore[arg-type]
        return [(p.name, p.kind, p.default) for p in parameters]

    assert shape(async_fn) == shape(sync_fn)


@pytest.mark.parametrize("flavour", ["async", "sync"])
def test_options_after_the_key_stay_keyword_only(flavour: str) -> None:
    """STYLE rule 7: ``locks(key)`` and ``locks.sync(key)`` take ``timeout=`` and ``ttl=`` by
    keyword only. (They are positional-or-keyword behind a guard, so CPython 3.11 specializes
    the call: anything passed after the key is refused, the signature shows keyword-only.)"""
    locks = KeyedLock()
    entry = locks if flavour == "async" else locks.sync
    with pytest.raises(TypeError, match="by keyword only"):
        entry("k", 5)  # type: ignore[arg-type]
    kinds = {p.name: p.kind for p in inspect.signature(entry).parameters.values()}
    assert kinds == {
        "key": inspect.Parameter.POSITIONAL_ONLY,
        "timeout": inspect.Parameter.KEYWORD_ONLY,
        "ttl": inspect.Parameter.KEYWORD_ONLY,
    }
    hold = entry("k", timeout=1, ttl=2)
    assert (hold.key, hold.ttl) == ("k", 2)
