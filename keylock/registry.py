"""KeyedLock: the front door: one lock per key, for async code, threads and decorators."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar, overload

from ._validate import MAX_KEY_LENGTH, check_key, check_timeout, check_ttl
from .backends.base import Backend, KeyStatistics
from .backends.memory import MemoryBackend
from .errors import LockTimeout

if TYPE_CHECKING:
    from .observe import Observer
from .lease import (
    _PENDING,
    _QUEUED,
    _SLOW_EXIT_OBSERVED,
    _TRACKED,
    Lease,
    LostCallback,
    new_owner,
)

__all__ = ["KeyFunc", "KeyedLock"]

P = ParamSpec("P")
R = TypeVar("R")

#: A decorator's key: a fixed string, or a function of the decorated call's arguments.
KeyFunc = str | Callable[..., str]  # type: ignore[explicit-any]  # any signature


class KeyedLock:
    """Per-key mutual exclusion: at most one live lease per ``(namespace, key)``.

    ``KeyedLock()`` locks within this process (:class:`~keylock.backends.MemoryBackend`); pass a
    ``FileBackend`` or ``RedisBackend`` to exclude other processes or hosts. Waiting honours
    ``timeout`` (None: forever; 0: one try; else seconds, then :class:`~keylock.LockTimeout`).
    A caller cancelled while waiting holds nothing afterwards.
    """

    __slots__ = (
        "_backend",
        "_cancel_on_lost",
        "_default_ttl",
        "_hold",
        "_inline_step",
        "_needs_owner",
        "_observer",
        "_on_lost",
        "_plain_step",
        "_prefix",
        "_release_sync",
        "namespace",
    )

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        namespace: str = "",
        on_lost: LostCallback | None = None,
        cancel_on_lost: bool = False,
        observer: Observer | None = None,
    ) -> None:
        if backend is not None and not isinstance(backend, Backend):
            raise TypeError(
                f"KeyedLock() takes a keylock backend (MemoryBackend, FileBackend, "
                f"RedisBackend), not {type(backend).__name__}"
            )
        if not isinstance(namespace, str) or "\x00" in namespace:
            raise TypeError(f"namespace must be a str without NUL, not {namespace!r}")
        self._backend = backend = backend if backend is not None else MemoryBackend()
        # copied from the backend once, for the hot path
        # bound once: the step when it may run inline on an event loop, else None
        self._inline_step = backend._try_acquire if backend.nonblocking_step else None
        self._release_sync = backend.release_sync
        # the commonest case, served by a shorter path: an in-process backend, no namespace,
        # no owner ids, no default TTL (then a plain ``locks(key)`` needs only the step)
        plain = backend.nonblocking_step and not backend.needs_owner and not namespace
        self._plain_step = backend._try_acquire if plain and backend.default_ttl is None else None
        self._needs_owner = backend.needs_owner
        self._default_ttl = backend.default_ttl
        self.namespace = namespace
        self._prefix = f"{namespace}:" if namespace else ""
        self._on_lost = on_lost
        self._cancel_on_lost = cancel_on_lost
        # Observed locks use a subclass of the hold; unobserved ones run no observer code at all.
        self._observer = observer
        self._hold: type[_Hold] = _Hold if observer is None else _ObservedHold

    def __repr__(self) -> str:
        return f"KeyedLock({self._backend!r}, namespace={self.namespace!r})"

    @property
    def backend(self) -> Backend:
        """The backend holding this lock's state."""
        return self._backend

    # --------------------------------------------------------------------------- entry points

    def __call__(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """``async with locks(key) as lease:`` holds *key* for the block (enter it once)."""
        hold = _new_hold(self._hold)  # no Python __init__ frame: this is on the hot path
        hold._locks = self
        hold.key = key
        hold.ttl = ttl
        hold._timeout = timeout
        hold._state = _PENDING
        return hold

    def sync(self, key: str, /, *, timeout: float | None = None, ttl: float | None = None) -> Lease:
        """``with locks.sync(key) as lease:`` holds *key* for the block, blocking the thread."""
        hold = _new_hold(self._hold)
        hold._locks = self
        hold.key = key
        hold.ttl = ttl
        hold._timeout = timeout
        hold._state = _PENDING
        return hold

    async def acquire(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Wait for *key* and return its lease; release it with ``await lease.release()``.

        Raises LockTimeout when *timeout* passes first; a cancelled caller holds nothing.
        """
        return await self._hold(self, key, ttl, timeout).__aenter__()

    def acquire_sync(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Blocking twin of :meth:`acquire`; a thread cannot be cancelled, but ``lease.lost``
        and ``on_lost`` still report a loss."""
        return self._hold(self, key, ttl, timeout).__enter__()

    def _track(self, lease: Lease) -> None:
        lease._state |= _TRACKED
        self._backend._track(lease)

    @overload
    def locked(
        self,
        fn: None = None,
        /,
        *,
        key: KeyFunc,
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]: ...

    @overload
    def locked(
        self,
        fn: Callable[P, R],
        /,
        *,
        key: KeyFunc,
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> Callable[P, R]: ...

    def locked(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        key: KeyFunc,
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate a sync or async function so each call holds the lock for *key*.

        *key* is a string or a function of the call's arguments returning one. Sync functions
        block their thread while waiting; async ones wait without blocking the loop.
        """
        if not (isinstance(key, str) or callable(key)):
            raise TypeError(f"locked(key=...) takes a str or a function, not {key!r}")
        if isinstance(key, str):
            check_key(key)

        def decorate(func: Callable[P, R]) -> Callable[P, R]:
            return _decorate(self, func, key, timeout, ttl)

        return decorate if fn is None else decorate(fn)

    def statistics(self, key: str, /) -> KeyStatistics:
        """Who holds *key* and how many wait, as this process can see it."""
        key = check_key(key)
        return self._backend.statistics(self._prefix + key)

    async def close(self) -> None:
        """Close the backend (connections, background renewal)."""
        await self._backend.close()

    def close_sync(self) -> None:
        """Blocking twin of :meth:`close`."""
        self._backend.close_sync()


_new_hold = object.__new__


class _Hold(Lease):
    """The lease behind ``locks(key)`` / ``locks.sync(key)``: acquired when the block is entered.

    One block per object (as ``asyncio.timeout``): call ``locks(key)`` again for the next one.
    """

    __slots__ = ("_timeout",)

    def __init__(
        self, locks: KeyedLock, key: str, ttl: float | None, timeout: float | None
    ) -> None:
        self._locks = locks
        self.key = key
        self.ttl = ttl
        self._state = _PENDING
        self._timeout = timeout

    def _enter_once(self) -> None:
        raise RuntimeError(
            f"keylock: this locks({self.key!r}) block was already entered: "
            "write a new locks(key) for each block"
        )

    # The two twins below differ only in how they wait (backend.acquire vs acquire_sync); the
    # shared steps are inlined on purpose: this is the uncontended hot path.

    async def __aenter__(self) -> Lease:
        if self._state is not _PENDING:  # (a small int: identity is equality, and cheaper)
            self._enter_once()
        locks = self._locks
        key = self.key
        plain = locks._plain_step
        if (
            plain is not None
            and self.ttl is None
            and self._timeout is None
            and type(key) is str
            and 0 < len(key) <= MAX_KEY_LENGTH
            and "\x00" not in key
        ):
            grant = plain(key, b"", None, None)
            if grant is not None:  # uncontended: nothing else to resolve
                self._full_key = key
                self._owner = b""
                self.token = grant[0]
                self.expires_at = None
                self._state = 0
                return self
        if type(key) is not str or not 0 < len(key) <= MAX_KEY_LENGTH or "\x00" in key:
            key = self.key = check_key(key)
        timeout = self._timeout
        if timeout is not None:
            timeout = check_timeout(timeout, key)
        ttl = self.ttl
        if ttl is not None:
            ttl = self.ttl = check_ttl(ttl, key)
        elif locks._default_ttl is not None:
            ttl = self.ttl = locks._default_ttl
        full = self._full_key = locks._prefix + key
        owner = self._owner = new_owner() if locks._needs_owner else b""
        step = locks._inline_step
        # the uncontended path: one step, no extra coroutine
        if step is not None and (grant := step(full, owner, ttl, None)) is not None:
            self._state = 0
        else:
            grant = await locks._backend.acquire(full, owner, timeout=timeout, ttl=ttl)
            self._state = 0 if step is None else _QUEUED
        self.token = grant[0]
        self.expires_at = grant[1]
        if ttl is not None:
            self._task = asyncio.current_task()
            locks._track(self)
        return self

    def __enter__(self) -> Lease:
        if self._state is not _PENDING:  # (a small int: identity is equality, and cheaper)
            self._enter_once()
        locks = self._locks
        key = self.key
        plain = locks._plain_step
        if (
            plain is not None
            and self.ttl is None
            and self._timeout is None
            and type(key) is str
            and 0 < len(key) <= MAX_KEY_LENGTH
            and "\x00" not in key
        ):
            grant = plain(key, b"", None, None)
            if grant is not None:  # uncontended: nothing else to resolve
                self._full_key = key
                self._owner = b""
                self.token = grant[0]
                self.expires_at = None
                self._state = 0
                return self
        if type(key) is not str or not 0 < len(key) <= MAX_KEY_LENGTH or "\x00" in key:
            key = self.key = check_key(key)
        timeout = self._timeout
        if timeout is not None:
            timeout = check_timeout(timeout, key)
        ttl = self.ttl
        if ttl is not None:
            ttl = self.ttl = check_ttl(ttl, key)
        elif locks._default_ttl is not None:
            ttl = self.ttl = locks._default_ttl
        full = self._full_key = locks._prefix + key
        owner = self._owner = new_owner() if locks._needs_owner else b""
        step = locks._inline_step
        if step is not None and (grant := step(full, owner, ttl, None)) is not None:
            self._state = 0
        else:
            grant = locks._backend.acquire_sync(full, owner, timeout=timeout, ttl=ttl)
            self._state = 0 if step is None else _QUEUED
        self.token = grant[0]
        self.expires_at = grant[1]
        if ttl is not None:
            locks._track(self)
        return self


class _ObservedHold(_Hold):
    """A hold that reports to its KeyedLock's observer: wait, hold time, timeouts."""

    __slots__ = ("_since",)

    def _observer(self) -> Observer:
        observer = self._locks._observer
        assert observer is not None
        return observer

    async def __aenter__(self) -> Lease:
        start = time.perf_counter()
        try:
            await _Hold.__aenter__(self)
        except LockTimeout:
            observer = self._observer()
            observer.timed_out(observer.prefix_of(self.key), time.perf_counter() - start)
            raise
        self._acquired(start)
        return self

    def __enter__(self) -> Lease:
        start = time.perf_counter()
        try:
            _Hold.__enter__(self)
        except LockTimeout:
            observer = self._observer()
            observer.timed_out(observer.prefix_of(self.key), time.perf_counter() - start)
            raise
        self._acquired(start)
        return self

    def _acquired(self, start: float) -> None:
        self._since = now = time.perf_counter()
        self._state |= _SLOW_EXIT_OBSERVED  # route every release through release()
        contended = None if self._locks._inline_step is None else bool(self._state & _QUEUED)
        observer = self._observer()
        observer.acquired(observer.prefix_of(self.key), now - start, contended=contended)

    def _released(self) -> None:
        observer = self._observer()
        observer.released(observer.prefix_of(self.key), time.perf_counter() - self._since)

    async def release(self) -> None:
        try:
            await _Hold.release(self)
        finally:
            self._released()

    def release_sync(self) -> None:
        try:
            _Hold.release_sync(self)
        finally:
            self._released()


def _decorate(
    locks: KeyedLock,
    func: Callable[P, R],
    key: KeyFunc,
    timeout: float | None,
    ttl: float | None,
) -> Callable[P, R]:
    def key_of(*args: object, **kwargs: object) -> str:
        return key if isinstance(key, str) else key(*args, **kwargs)

    if inspect.iscoroutinefunction(func):
        afunc: Callable[P, Awaitable[object]] = func

        @functools.wraps(func)
        async def alocked(*args: P.args, **kwargs: P.kwargs) -> object:
            async with locks(key_of(*args, **kwargs), timeout=timeout, ttl=ttl):
                return await afunc(*args, **kwargs)

        return alocked  # type: ignore[return-value]

    @functools.wraps(func)
    def slocked(*args: P.args, **kwargs: P.kwargs) -> R:
        with locks.sync(key_of(*args, **kwargs), timeout=timeout, ttl=ttl):
            return func(*args, **kwargs)

    return slocked
