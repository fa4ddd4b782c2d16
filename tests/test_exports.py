"""The public surface, pinned: exports, their module, a light import, and sync/async twins that
take exactly the same parameters (STYLE rule 6: redis-py's ``sleep=`` on one side only would
fail here)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import keylock
import keylock.backends
from keylock import KeyedLock, KeyedRWLock, KeyedSemaphore, Lease, SingleFlight, fencing
from keylock.backends import Backend

KEYLOCK_ALL = [
    "COUNTERS",
    "MAX_KEY_LENGTH",
    "SUPERSEDED",
    "BackendUnavailable",
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
    "Observer",
    "PrefixStats",
    "SingleFlight",
    "StaleToken",
    "Superseded",
    "stale_guard",
    "stats",
]

BACKENDS_ALL = [
    "Backend",
    "FileBackend",
    "Grant",
    "KeyStatistics",
    "MemoryBackend",
    "PostgresBackend",
    "RedisBackend",
]


def test_keylock_all_is_pinned() -> None:
    assert keylock.__all__ == KEYLOCK_ALL
    for name in KEYLOCK_ALL:
        assert hasattr(keylock, name), name


def test_backends_all_is_pinned() -> None:
    assert keylock.backends.__all__ == BACKENDS_ALL
    for name in BACKENDS_ALL:
        assert isinstance(getattr(keylock.backends, name), type), name


def test_design_names_exist() -> None:
    """The names DESIGN.md promises."""
    from keylock import SUPERSEDED, KeyedLock, Lease, SingleFlight, stale_guard  # noqa: F401
    from keylock.backends import (  # noqa: F401
        FileBackend,
        MemoryBackend,
        PostgresBackend,
        RedisBackend,
    )

    assert callable(stale_guard)


@pytest.mark.parametrize("name", KEYLOCK_ALL)
def test_top_level_classes_and_functions_present_as_keylock(name: str) -> None:
    obj = getattr(keylock, name)
    if isinstance(obj, type) or inspect.isfunction(obj):
        assert obj.__module__ == "keylock", name


def test_import_keylock_does_not_import_redis_or_portalocker() -> None:
    code = (
        "import sys, keylock, keylock.backends; "
        "heavy = sorted(m for m in ('redis', 'portalocker') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_lazy_backends_still_load() -> None:
    code = (
        "import sys, keylock.backends as b; "
        "assert b.FileBackend.__name__ == 'FileBackend' and 'portalocker' in sys.modules; "
        "assert b.RedisBackend.__name__ == 'RedisBackend' and 'redis' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with pytest.raises(AttributeError, match="NoSuchBackend"):
        keylock.backends.NoSuchBackend  # noqa: B018


TWINS = [
    (Lease.extend, Lease.extend_sync),
    (Lease.release, Lease.release_sync),
    (KeyedLock.acquire, KeyedLock.acquire_sync),
    (KeyedLock.__call__, KeyedLock.sync),
    (KeyedLock.close, KeyedLock.close_sync),
    (KeyedSemaphore.acquire, KeyedSemaphore.acquire_sync),
    (KeyedSemaphore.__call__, KeyedSemaphore.sync),
    (KeyedSemaphore.close, KeyedSemaphore.close_sync),
    (KeyedRWLock.acquire, KeyedRWLock.acquire_sync),
    (KeyedRWLock.acquire_read, KeyedRWLock.acquire_read_sync),
    (KeyedRWLock.acquire_write, KeyedRWLock.acquire_write_sync),
    (KeyedRWLock.read, KeyedRWLock.read_sync),
    (KeyedRWLock.write, KeyedRWLock.write_sync),
    (KeyedRWLock.__call__, KeyedRWLock.sync),
    (KeyedRWLock.close, KeyedRWLock.close_sync),
    (Backend.acquire, Backend.acquire_sync),
    (Backend.release, Backend.release_sync),
    (Backend.extend, Backend.extend_sync),
    (Backend.close, Backend.close_sync),
]


@pytest.mark.parametrize(
    ("async_fn", "sync_fn"), TWINS, ids=[sync.__qualname__ for _, sync in TWINS]
)
def test_sync_twins_take_the_same_parameters(async_fn: object, sync_fn: object) -> None:
    holds = (KeyedLock.__call__, KeyedRWLock.__call__, KeyedRWLock.read, KeyedRWLock.write)
    assert inspect.iscoroutinefunction(async_fn) or async_fn in holds
    assert not inspect.iscoroutinefunction(sync_fn)
    async_sig = inspect.signature(async_fn)  # type: ignore[arg-type]
    sync_sig = inspect.signature(sync_fn)  # type: ignore[arg-type]
    assert async_sig.parameters == sync_sig.parameters


OVERRIDES = [
    (cls.acquire, cls.acquire_sync)
    for cls in (keylock.backends.RedisBackend, keylock.backends.FileBackend)
] + [
    (keylock.backends.RedisBackend.release, keylock.backends.RedisBackend.release_sync),
    (keylock.backends.RedisBackend.extend, keylock.backends.RedisBackend.extend_sync),
    (keylock.backends.RedisBackend.close, keylock.backends.RedisBackend.close_sync),
]


@pytest.mark.parametrize(
    ("async_fn", "sync_fn"), OVERRIDES, ids=[sync.__qualname__ for _, sync in OVERRIDES]
)
def test_backend_overrides_keep_the_base_parameters(async_fn: object, sync_fn: object) -> None:
    """A backend that writes its own twins keeps them equal to each other and to the base."""
    base = getattr(Backend, sync_fn.__name__)  # type: ignore[attr-defined]
    assert inspect.signature(async_fn).parameters == inspect.signature(sync_fn).parameters  # type: ignore[arg-type]
    assert inspect.signature(sync_fn).parameters == inspect.signature(base).parameters  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("async_fn", "sync_fn"),
    [(fencing.fenced_set, fencing.fenced_set_sync), (fencing.fenced_get, fencing.fenced_get_sync)],
)
def test_fencing_twins_differ_only_in_the_client_they_take(
    async_fn: object, sync_fn: object
) -> None:
    a = inspect.signature(async_fn).parameters  # type: ignore[arg-type]
    s = inspect.signature(sync_fn).parameters  # type: ignore[arg-type]
    assert list(a) == list(s)
    assert all(a[name] == s[name] for name in a if name != "client")


def test_single_flight_twins_differ_only_in_the_function_they_take() -> None:
    """``do`` takes a coroutine function and ``do_sync`` a plain one: everything else is equal."""
    do = inspect.signature(SingleFlight.do).parameters
    do_sync = inspect.signature(SingleFlight.do_sync).parameters
    assert list(do) == list(do_sync)
    for name in do:
        a, s = do[name], do_sync[name]
        assert (a.kind, a.default) == (s.kind, s.default), name
        if name != "fn":
            assert a == s, name
    assert do["fn"].annotation != do_sync["fn"].annotation
