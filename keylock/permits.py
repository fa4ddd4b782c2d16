"""KeyedSemaphore and KeyedRWLock: KeyedLock over a backend's permit views.

Both are :class:`~keylock.KeyedLock` on ``backend.permits(limit, weight)`` (see
:class:`~keylock.backends.base.Permits`), so every KeyedLock guarantee holds per permit (a
lease owned by its acquisition, fencing tokens, timeouts and cancellation leaving nothing,
``on_lost``, observers) and the surface is the same. The permit keyspace is separate from the
lock keyspace: a KeyedLock and a KeyedSemaphore on one name do not see each other.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, ParamSpec, TypeVar, overload

from ._validate import check_key
from .backends.base import RW_LIMIT, Backend, KeyStatistics
from .backends.memory import MemoryBackend
from .registry import AsyncHold, KeyedLock, KeyFunc, SyncHold, not_a_backend

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._host import LostCallback
    from .lease import Lease
    from .observe import Observer

__all__ = ["KeyedRWLock", "KeyedSemaphore"]

P = ParamSpec("P")
R = TypeVar("R")


def _check_limit(limit: object) -> int:
    if type(limit) is not int:  # (True is an int to isinstance: refused here)
        raise TypeError(
            f"KeyedSemaphore(limit=...) takes a positive int, not {limit!r}: e.g. limit=4"
        )
    if not 1 <= limit < RW_LIMIT:
        raise ValueError(
            f"KeyedSemaphore(limit={limit}): the limit must be between 1 and {RW_LIMIT - 1} "
            "(how many leases of one key may be held at once)"
        )
    return limit


def _parent(backend: object, what: str) -> Backend:
    if backend is None:
        return MemoryBackend()
    if not isinstance(backend, Backend):
        raise not_a_backend(what, backend)
    return backend


class _OnPermits(KeyedLock):
    """A KeyedLock over a permit view of *parent*; ``backend`` and ``close`` are the
    parent's (the view owns nothing)."""

    __slots__ = ("_parent",)

    def __init__(
        self,
        parent: Backend,
        limit: int,
        weight: int,
        *,
        namespace: str,
        on_lost: LostCallback | None,
        cancel_on_lost: bool,
        observer: Observer | None,
    ) -> None:
        self._parent = parent
        super().__init__(
            parent.permits(limit, weight),
            namespace=namespace,
            on_lost=on_lost,
            cancel_on_lost=cancel_on_lost,
            observer=observer,
        )

    @property
    def backend(self) -> Backend:
        """The backend holding this object's state (the one it was given)."""
        return self._parent

    def statistics(self, key: str, /) -> KeyStatistics:
        """Who holds *key* (the newest holder), how many hold it, how many wait."""
        key = check_key(key)
        found = self._backend.statistics(self._prefix + key)
        return dataclasses.replace(found, key=f"{self.namespace}:{key}" if self.namespace else key)

    async def close(self) -> None:
        """Close the backend (connections, background renewal)."""
        await self._parent.close()

    def close_sync(self) -> None:
        """Blocking twin of :meth:`close`."""
        self._parent.close_sync()


class KeyedSemaphore(_OnPermits):
    """Per-key semaphores: at most ``limit`` live leases per ``(namespace, key)``.

    Waiters are served FIFO; tokens strictly increase per key across all permits; a lease whose
    holder died frees its permit (TTL / the OS / the server session, as for locks). Two
    clients that use one key with different limits get :class:`~keylock.LimitMismatch`,
    never ``limit + 1`` holders. A block holding a permit of a key that waits for another
    permit of the same key gets RuntimeError (it could wait for itself).
    """

    __slots__ = ("limit",)

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        limit: int,
        namespace: str = "",
        on_lost: LostCallback | None = None,
        cancel_on_lost: bool = False,
        observer: Observer | None = None,
    ) -> None:
        self.limit = _check_limit(limit)
        super().__init__(
            _parent(backend, "KeyedSemaphore"),
            limit,
            1,
            namespace=namespace,
            on_lost=on_lost,
            cancel_on_lost=cancel_on_lost,
            observer=observer,
        )

    def __repr__(self) -> str:
        return f"KeyedSemaphore({self._parent!r}, limit={self.limit}, namespace={self.namespace!r})"


class KeyedRWLock:
    """Per-key read-write locks: many readers, or one writer, per ``(namespace, key)``.

    Served FIFO across modes: a waiting writer blocks readers that arrive after it, so a
    stream of readers never starves a writer. Tokens strictly increase per key across modes
    (a writer's token is above every token granted before it). ``rw(key)``, ``rw.sync(key)``,
    ``acquire`` and ``locked`` take the write lock (the exclusive one); ``rw.read(key)`` and
    its twins the read lock. ``rw.reader`` and ``rw.writer`` are the two KeyedLocks.
    """

    __slots__ = ("_parent", "namespace", "reader", "writer")

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        namespace: str = "",
        on_lost: LostCallback | None = None,
        cancel_on_lost: bool = False,
        observer: Observer | None = None,
    ) -> None:
        self._parent = parent = _parent(backend, "KeyedRWLock")
        options = {
            "namespace": namespace,
            "on_lost": on_lost,
            "cancel_on_lost": cancel_on_lost,
            "observer": observer,
        }
        self.reader: KeyedLock = _OnPermits(parent, RW_LIMIT, 1, **options)  # type: ignore[arg-type]
        self.writer: KeyedLock = _OnPermits(parent, RW_LIMIT, RW_LIMIT, **options)  # type: ignore[arg-type]
        self.namespace = self.reader.namespace

    def __repr__(self) -> str:
        return f"KeyedRWLock({self._parent!r}, namespace={self.namespace!r})"

    @property
    def backend(self) -> Backend:
        """The backend holding this lock's state."""
        return self._parent

    @property
    def observer(self) -> Observer | None:
        """The observer this lock reports to (both modes), if any."""
        return self.writer.observer

    # reads
    def read(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> AsyncHold:
        """``async with rw.read(key) as lease:`` shares *key* with other readers."""
        return self.reader(key, timeout=timeout, ttl=ttl)

    def read_sync(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> SyncHold:
        """``with rw.read_sync(key) as lease:``: blocking twin of :meth:`read`."""
        return self.reader.sync(key, timeout=timeout, ttl=ttl)

    async def acquire_read(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Wait for a read lease on *key*; release it with ``await lease.release()``."""
        return await self.reader.acquire(key, timeout=timeout, ttl=ttl)

    def acquire_read_sync(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Blocking twin of :meth:`acquire_read`."""
        return self.reader.acquire_sync(key, timeout=timeout, ttl=ttl)

    # writes
    def write(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> AsyncHold:
        """``async with rw.write(key) as lease:`` holds *key* alone (no reader, no writer)."""
        return self.writer(key, timeout=timeout, ttl=ttl)

    def write_sync(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> SyncHold:
        """``with rw.write_sync(key) as lease:``: blocking twin of :meth:`write`."""
        return self.writer.sync(key, timeout=timeout, ttl=ttl)

    async def acquire_write(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Wait for the write lease on *key*; release it with ``await lease.release()``."""
        return await self.writer.acquire(key, timeout=timeout, ttl=ttl)

    def acquire_write_sync(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Blocking twin of :meth:`acquire_write`."""
        return self.writer.acquire_sync(key, timeout=timeout, ttl=ttl)

    # KeyedLock's surface: the exclusive (write) lock
    def __call__(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> AsyncHold:
        """``async with rw(key)``: the write lock (as :meth:`write`)."""
        return self.writer(key, timeout=timeout, ttl=ttl)

    def sync(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> SyncHold:
        """``with rw.sync(key)``: the write lock (as :meth:`write_sync`)."""
        return self.writer.sync(key, timeout=timeout, ttl=ttl)

    async def acquire(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """The write lease (as :meth:`acquire_write`)."""
        return await self.writer.acquire(key, timeout=timeout, ttl=ttl)

    def acquire_sync(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Blocking twin of :meth:`acquire`."""
        return self.writer.acquire_sync(key, timeout=timeout, ttl=ttl)

    @overload
    def locked(
        self,
        fn: None = None,
        /,
        *,
        key: KeyFunc,
        mode: Literal["read", "write"] = "write",
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
        mode: Literal["read", "write"] = "write",
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> Callable[P, R]: ...

    def locked(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        key: KeyFunc,
        mode: Literal["read", "write"] = "write",
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate a function so each call holds *key* in *mode* ("read" or "write")."""
        if mode not in ("read", "write"):
            raise ValueError(f"locked(mode=...) is 'read' or 'write', not {mode!r}")
        locks = self.reader if mode == "read" else self.writer
        return locks.locked(fn, key=key, timeout=timeout, ttl=ttl)

    def statistics(self, key: str, /) -> KeyStatistics:
        """Who holds *key* (the newest holder), how many hold it, how many wait (both modes)."""
        return self.reader.statistics(key)

    async def close(self) -> None:
        """Close the backend (connections, background renewal)."""
        await self._parent.close()

    def close_sync(self) -> None:
        """Blocking twin of :meth:`close`."""
        self._parent.close_sync()
