"""KeyedLock: the front door: one lock per key, for async code, threads and decorators."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import ParamSpec, TypeVar, overload

from ._validate import check_key, check_timeout, check_ttl
from .backends.base import Backend, Grant, KeyStatistics
from .backends.memory import MemoryBackend
from .lease import Lease, LostCallback, new_owner

__all__ = ["KeyFunc", "KeyedLock"]

P = ParamSpec("P")
R = TypeVar("R")

#: A decorator's key: a fixed string, or a function of the decorated call's arguments.
KeyFunc = str | Callable[..., str]


class KeyedLock:
    """Per-key mutual exclusion: at most one live lease per ``(namespace, key)``.

    ``KeyedLock()`` locks within this process (:class:`~keylock.backends.MemoryBackend`); pass a
    ``FileBackend`` or ``RedisBackend`` to exclude other processes or hosts. Waiting honours
    ``timeout`` (None: forever; 0: one try; else seconds, then :class:`~keylock.LockTimeout`).
    A caller cancelled while waiting holds nothing afterwards.
    """

    __slots__ = ("_backend", "_cancel_on_lost", "_on_lost", "_prefix", "namespace")

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        namespace: str = "",
        on_lost: LostCallback | None = None,
        cancel_on_lost: bool = False,
    ) -> None:
        if backend is not None and not isinstance(backend, Backend):
            raise TypeError(
                f"KeyedLock() takes a keylock backend (MemoryBackend, FileBackend, "
                f"RedisBackend), not {type(backend).__name__}"
            )
        if not isinstance(namespace, str) or "\x00" in namespace:
            raise TypeError(f"namespace must be a str without NUL, not {namespace!r}")
        self._backend = backend if backend is not None else MemoryBackend()
        self.namespace = namespace
        self._prefix = f"{namespace}:" if namespace else ""
        self._on_lost = on_lost
        self._cancel_on_lost = cancel_on_lost

    def __repr__(self) -> str:
        return f"KeyedLock({self._backend!r}, namespace={self.namespace!r})"

    @property
    def backend(self) -> Backend:
        """The backend holding this lock's state."""
        return self._backend

    # --------------------------------------------------------------------------- entry points

    def __call__(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> _Hold:
        """``async with locks(key) as lease:`` holds *key* for the block."""
        return _Hold(self, key, timeout, ttl)

    def sync(self, key: str, /, *, timeout: float | None = None, ttl: float | None = None) -> _Hold:
        """``with locks.sync(key) as lease:`` holds *key* for the block, blocking the thread."""
        return _Hold(self, key, timeout, ttl)

    async def acquire(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Wait for *key* and return its lease; release it with ``await lease.release()``.

        Raises LockTimeout when *timeout* passes first; a cancelled caller holds nothing.
        """
        key = check_key(key)
        full = self._prefix + key if self._prefix else key
        if timeout is not None:
            timeout = check_timeout(timeout, key)
        ttl = self._resolve_ttl(ttl, key)
        owner = new_owner()
        backend = self._backend
        grant: Grant | None = None
        if backend.nonblocking_step:  # the uncontended path: one step, no coroutine
            grant = backend._try_acquire(full, owner, ttl, None)
        if grant is None:
            grant = await backend.acquire(full, owner, timeout=timeout, ttl=ttl)
        lease = Lease(
            backend,
            key,
            full,
            owner,
            grant,
            ttl,
            on_lost=self._on_lost,
            cancel_on_lost=self._cancel_on_lost,
        )
        if ttl is not None:
            lease._task = asyncio.current_task()
            self._track(lease)
        return lease

    def acquire_sync(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Blocking twin of :meth:`acquire`."""
        key = check_key(key)
        full = self._prefix + key if self._prefix else key
        if timeout is not None:
            timeout = check_timeout(timeout, key)
        ttl = self._resolve_ttl(ttl, key)
        owner = new_owner()
        grant = self._backend.acquire_sync(full, owner, timeout=timeout, ttl=ttl)
        lease = Lease(
            self._backend,
            key,
            full,
            owner,
            grant,
            ttl,
            on_lost=self._on_lost,
            cancel_on_lost=False,  # a thread cannot be cancelled; lease.lost still reports it
        )
        if ttl is not None:
            self._track(lease)
        return lease

    def _resolve_ttl(self, ttl: float | None, key: str) -> float | None:
        if ttl is None:
            return self._backend.default_ttl
        return check_ttl(ttl, key)

    def _track(self, lease: Lease) -> None:
        lease._tracked = True
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


class _Hold:
    """The context manager behind ``locks(key)`` and ``locks.sync(key)``."""

    __slots__ = ("_key", "_lease", "_locks", "_timeout", "_ttl")

    def __init__(
        self, locks: KeyedLock, key: str, timeout: float | None, ttl: float | None
    ) -> None:
        self._locks = locks
        self._key = key
        self._timeout = timeout
        self._ttl = ttl
        self._lease: Lease | None = None

    def _take(self) -> Lease:
        lease = self._lease
        if lease is None:
            raise RuntimeError("keylock: exiting a lock block that was never entered")
        self._lease = None
        return lease

    async def __aenter__(self) -> Lease:
        if self._lease is not None:
            raise RuntimeError(f"keylock: the block for {self._key!r} is already entered")
        self._lease = await self._locks.acquire(self._key, timeout=self._timeout, ttl=self._ttl)
        return self._lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._take().__aexit__(exc_type, exc, tb)

    def __enter__(self) -> Lease:
        if self._lease is not None:
            raise RuntimeError(f"keylock: the block for {self._key!r} is already entered")
        self._lease = self._locks.acquire_sync(self._key, timeout=self._timeout, ttl=self._ttl)
        return self._lease

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._take().__exit__(exc_type, exc, tb)


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
