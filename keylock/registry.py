"""KeyedLock: the front door: one lock per key, for async code, threads and decorators."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar, overload

from ._callables import is_async_callable, refuse_awaitable
from ._host import LeaseHost, LostCallback, report
from ._validate import MAX_KEY_LENGTH, check_key, check_namespace, check_timeout, check_ttl
from .backends.base import Backend, KeyStatistics
from .backends.memory import MemoryBackend
from .errors import LockTimeout
from .lease import _PENDING, _QUEUED, _SLOW_EXIT_OBSERVED, _TRACKED, Lease, new_owner

if TYPE_CHECKING:
    from .observe import Observer

__all__ = ["AsyncHold", "KeyFunc", "KeyedLock", "SyncHold"]

P = ParamSpec("P")
R = TypeVar("R")
logger = logging.getLogger("keylock")

#: A decorator's key: a fixed string, or a function of the decorated call's arguments.
KeyFunc = str | Callable[..., str]  # type: ignore[explicit-any]  # any signature


class KeyedLock:
    """Per-key mutual exclusion: at most one live lease per ``(namespace, key)``.

    ``KeyedLock()`` locks within this process (:class:`~keylock.backends.MemoryBackend`); pass a
    ``FileBackend`` or ``RedisBackend`` to exclude other processes or hosts. Waiting honours
    ``timeout`` (None: forever; 0: one try; else seconds, then :class:`~keylock.LockTimeout`).
    A caller cancelled while waiting holds nothing afterwards. Two namespaces never share a
    lock, whatever their keys (``("a:b", "c")`` and ``("a", "b:c")`` are distinct).
    """

    __slots__ = (
        "_async_hold",
        "_backend",
        "_default_ttl",
        "_host",
        "_inline_step",
        "_needs_owner",
        "_plain_step",
        "_prefix",
        "_sync_hold",
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
        if on_lost is not None and not callable(on_lost):
            raise TypeError(f"on_lost must be a function of the lease, not {on_lost!r}")
        self.namespace = check_namespace(namespace)
        self._backend = backend = backend if backend is not None else MemoryBackend()
        self._host = LeaseHost(
            backend, observer=observer, on_lost=on_lost, cancel_on_lost=bool(cancel_on_lost)
        )
        # copied from the backend once, for the hot path
        # bound once: the step when it may run inline on an event loop, else None
        self._inline_step = backend._try_acquire if backend.nonblocking_step else None
        # the commonest case, served by a shorter path: an in-process backend, no namespace,
        # no owner ids, no default TTL (then a plain ``locks(key)`` needs only the step)
        plain = backend.nonblocking_step and not backend.needs_owner and not namespace
        self._plain_step = backend._try_acquire if plain and backend.default_ttl is None else None
        self._needs_owner = backend.needs_owner
        self._default_ttl = backend.default_ttl
        # NUL never occurs in a key or a namespace, so "namespace NUL key" is unambiguous
        self._prefix = f"{namespace}\x00" if namespace else ""
        # Observed locks use subclasses of the holds; unobserved ones run no observer code.
        self._async_hold: type[AsyncHold] = AsyncHold if observer is None else _ObservedAsync
        self._sync_hold: type[SyncHold] = SyncHold if observer is None else _ObservedSync

    def __repr__(self) -> str:
        return f"KeyedLock({self._backend!r}, namespace={self.namespace!r})"

    @property
    def backend(self) -> Backend:
        """The backend holding this lock's state."""
        return self._backend

    @property
    def observer(self) -> Observer | None:
        """The observer this lock reports to, if any."""
        return self._host.observer

    # --------------------------------------------------------------------------- entry points

    def __call__(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> AsyncHold:
        """``async with locks(key) as lease:`` holds *key* for the block (enter it once).

        For threads and sync code use ``with locks.sync(key)``: this object refuses ``with``.
        """
        hold = _new_hold(self._async_hold)  # no Python __init__ frame: this is the hot path
        hold._locks = self
        hold._host = self._host
        hold.key = key
        hold.ttl = ttl
        hold._timeout = timeout
        hold._state = _PENDING
        return hold

    def sync(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> SyncHold:
        """``with locks.sync(key) as lease:`` holds *key* for the block, blocking the thread.

        In a coroutine use ``async with locks(key)``: this object refuses ``async with``.
        """
        hold = _new_hold(self._sync_hold)
        hold._locks = self
        hold._host = self._host
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
        return await self(key, timeout=timeout, ttl=ttl).__aenter__()

    def acquire_sync(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Blocking twin of :meth:`acquire`; a thread cannot be cancelled, but ``lease.lost``
        and ``on_lost`` still report a loss."""
        return self.sync(key, timeout=timeout, ttl=ttl).__enter__()

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
        block their thread while waiting; async ones (anything whose call returns an awaitable)
        wait without blocking the loop and hold the lock until the awaitable finishes.
        """
        if not (isinstance(key, str) or callable(key)):
            raise TypeError(f"locked(key=...) takes a str or a function, not {key!r}")
        if isinstance(key, str):
            check_key(key)
        if timeout is not None:
            check_timeout(timeout, key if isinstance(key, str) else "<key>")
        if ttl is not None:
            check_ttl(ttl, key if isinstance(key, str) else "<key>")

        def decorate(func: Callable[P, R]) -> Callable[P, R]:
            return _decorate(self, func, key, timeout, ttl)

        return decorate if fn is None else decorate(fn)

    def statistics(self, key: str, /) -> KeyStatistics:
        """Who holds *key* and how many wait, as this process can see it."""
        key = check_key(key)
        found = self._backend.statistics(self._prefix + key)
        shown = f"{self.namespace}:{key}" if self.namespace else key  # as errors name it
        return KeyStatistics(shown, found.held, found.token, found.owner, found.waiting)

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

    __slots__ = ("_locks", "_timeout")

    _locks: KeyedLock
    _timeout: float | None

    def _enter_once(self) -> None:
        raise RuntimeError(
            f"keylock: this locks({self.key!r}) block was already entered: "
            "write a new locks(key) for each block"
        )

    def _resolve(self) -> tuple[str, bytes, float | None, float | None]:
        """Check the arguments; return (full key, owner, ttl, timeout) for the backend."""
        locks = self._locks
        key = self.key = check_key(self.key)
        timeout = self._timeout
        if timeout is not None:
            timeout = check_timeout(timeout, key)
        ttl = self.ttl
        if ttl is not None:
            ttl = self.ttl = check_ttl(ttl, key)
        elif locks._default_ttl is not None:
            ttl = self.ttl = locks._default_ttl
        full = self._full_key = locks._prefix + key
        self._owner = new_owner() if locks._needs_owner else b""
        return full, self._owner, ttl, timeout


class AsyncHold(_Hold):
    """``locks(key)``: for ``async with`` only."""

    __slots__ = ()

    async def __aenter__(self) -> Lease:
        if self._state is not _PENDING:  # (a small int: identity is equality, and cheaper)
            self._enter_once()
        locks = self._locks
        plain = locks._plain_step
        key = self.key
        if (  # (inlined: this is the uncontended hot path)
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
                self.expires_at = self._deadline = None
                self._state = 0
                return self
        full, owner, ttl, timeout = self._resolve()
        step = locks._inline_step
        # the uncontended path: one step, no extra coroutine
        if step is not None and (grant := step(full, owner, ttl, None)) is not None:
            self._state = 0
        else:
            grant = await locks._backend.acquire(full, owner, timeout=timeout, ttl=ttl)
            self._state = 0 if step is None else _QUEUED
        self._granted(grant)
        if ttl is not None:
            self._task = asyncio.current_task()
            self._state |= _TRACKED
            locks._backend._track(self)
        return self

    def __enter__(self) -> Lease:
        raise TypeError(
            f"locks({self.key!r}) is for 'async with' in a coroutine; in sync code or a thread "
            f"use 'with locks.sync({self.key!r})'"
        )


class SyncHold(_Hold):
    """``locks.sync(key)``: for ``with`` only."""

    __slots__ = ()

    def __enter__(self) -> Lease:
        if self._state is not _PENDING:  # (a small int: identity is equality, and cheaper)
            self._enter_once()
        locks = self._locks
        plain = locks._plain_step
        key = self.key
        if (  # (inlined: this is the uncontended hot path)
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
                self.expires_at = self._deadline = None
                self._state = 0
                return self
        full, owner, ttl, timeout = self._resolve()
        step = locks._inline_step
        if step is not None and (grant := step(full, owner, ttl, None)) is not None:
            self._state = 0
        else:
            if timeout != 0 and asyncio._get_running_loop() is not None:
                _refuse_blocking_the_loop(self.key)
            grant = locks._backend.acquire_sync(full, owner, timeout=timeout, ttl=ttl)
            self._state = 0 if step is None else _QUEUED
        self._granted(grant)
        if ttl is not None:
            self._state |= _TRACKED
            locks._backend._track(self)
        return self

    async def __aenter__(self) -> Lease:
        raise TypeError(
            f"locks.sync({self.key!r}) is for 'with' in sync code; in a coroutine use "
            f"'async with locks({self.key!r})', which waits without blocking the event loop"
        )


class _Observed(_Hold):
    """Reports to the lock's observer: wait, hold time, timeouts. An observer that raises is
    logged and ignored: it never costs a grant or a release."""

    __slots__ = ("_since",)

    def _observer(self) -> Observer:
        observer = self._host.observer
        assert observer is not None
        return observer

    def _timed_out(self, start: float) -> None:
        observer = self._observer()
        waited = time.perf_counter() - start
        report(
            "Observer.timed_out", lambda: observer.timed_out(observer.prefix_of(self.key), waited)
        )

    def _acquired(self, start: float) -> None:
        self._since = now = time.perf_counter()
        self._state |= _SLOW_EXIT_OBSERVED  # route every release through release()
        contended = None if self._locks._inline_step is None else bool(self._state & _QUEUED)
        observer = self._observer()
        report(
            "Observer.acquired",
            lambda: observer.acquired(
                observer.prefix_of(self.key), now - start, contended=contended
            ),
        )

    def _released(self) -> None:
        observer = self._observer()
        held = time.perf_counter() - self._since
        report("Observer.released", lambda: observer.released(observer.prefix_of(self.key), held))

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


class _ObservedAsync(_Observed, AsyncHold):
    __slots__ = ()

    async def __aenter__(self) -> Lease:
        start = time.perf_counter()
        try:
            await AsyncHold.__aenter__(self)
        except LockTimeout:
            self._timed_out(start)
            raise
        self._acquired(start)
        return self


class _ObservedSync(_Observed, SyncHold):
    __slots__ = ()

    def __enter__(self) -> Lease:
        start = time.perf_counter()
        try:
            SyncHold.__enter__(self)
        except LockTimeout:
            self._timed_out(start)
            raise
        self._acquired(start)
        return self


def _refuse_blocking_the_loop(key: str) -> None:
    """A sync acquire that may wait, on a thread running an event loop, would stop that loop
    while it waits, and deadlock it when a task of that loop holds the key."""
    raise RuntimeError(
        f"keylock: locks.sync({key!r}) would block this thread's running event loop while it "
        f"waits (and never return if a task on that loop holds {key!r}); in a coroutine use "
        f"'async with locks({key!r})', or run the sync code in a thread (asyncio.to_thread)"
    )


def _decorate(
    locks: KeyedLock,
    func: Callable[P, R],
    key: KeyFunc,
    timeout: float | None,
    ttl: float | None,
) -> Callable[P, R]:
    def key_of(*args: object, **kwargs: object) -> str:
        return key if isinstance(key, str) else key(*args, **kwargs)

    if is_async_callable(func):
        afunc: Callable[P, Awaitable[object]] = func  # type: ignore[assignment]

        @functools.wraps(func)
        async def alocked(*args: P.args, **kwargs: P.kwargs) -> object:
            async with locks(key_of(*args, **kwargs), timeout=timeout, ttl=ttl):
                return await afunc(*args, **kwargs)

        return alocked  # type: ignore[return-value]

    @functools.wraps(func)
    def slocked(*args: P.args, **kwargs: P.kwargs) -> R:
        with locks.sync(key_of(*args, **kwargs), timeout=timeout, ttl=ttl):
            result = func(*args, **kwargs)
            # an awaitable's body would run after the lock is released: refuse it here
            refuse_awaitable(func, result, "locked")
            return result

    return slocked
