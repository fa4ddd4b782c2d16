"""Lease: one granted hold on one key, with its fencing token; released once, by its holder."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._validate import check_ttl
from .errors import LeaseLost

if TYPE_CHECKING:
    from types import TracebackType

    from .registry import KeyedLock

__all__ = ["Lease", "LostCallback"]

logger = logging.getLogger("keylock")

#: Called with the lease when keylock learns the lease was lost (expired or taken over).
LostCallback = Callable[["Lease"], object]

# Owner ids: 128 random bits from a private generator seeded by the OS (a user's random.seed()
# must not make two processes mint the same ids), reseeded in forked children.
_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)


def new_owner() -> bytes:
    """A fresh random 128-bit owner id."""
    return _rng.getrandbits(128).to_bytes(16)


# Lease._state bits
_RELEASED = 1  # release() was called
_LOST = 2  # keylock learned the lease was lost
_TRACKED = 4  # the backend looks after it (auto-renew) until release
_CANCELLED_FOR_LOSS = 8  # its task was cancelled because the lease was lost
_PENDING = 16  # not granted yet (a ``locks(key)`` block not entered yet)
_QUEUED = 32  # granted after waiting in the queue (an observer counts it as a hand-off)
_SLOW_EXIT_OBSERVED = 64  # an observer wants to see the release
# release needs more than the backend call
_SLOW_EXIT = _RELEASED | _TRACKED | _PENDING | _SLOW_EXIT_OBSERVED


class Lease:
    """A hold on ``key``: exclusive while live; ``token`` fences writes made under it.

    ``lost`` becomes true when the lease expired or was taken over; from then on the holder is
    no longer protected and must reconcile rather than act. ``release()`` on a lost lease raises
    :class:`~keylock.LeaseLost`. A lease belongs to its acquisition, not to a task or thread:
    whoever holds this object may release it, exactly once.
    """

    __slots__ = (
        "__weakref__",
        "_full_key",
        "_locks",
        "_minted_owner",  # owner id shown to users of backends that need none; set when read
        "_owner",
        "_state",
        "_task",  # set only for leases with a TTL (cancel_on_lost); read with getattr
        "expires_at",
        "key",
        "token",
        "ttl",
    )

    key: str  #: the key as the caller named it (without namespace)
    token: int  #: fencing token: strictly increasing per key, never reused
    expires_at: float | None  #: time.time() when the lease lapses; None = never
    ttl: float | None  #: lease length used by extend() and auto-renew; None = no expiry
    _full_key: str  # namespace + key, as the backend knows it
    _owner: bytes  # the owner id the backend knows (b"" when the token alone proves ownership)

    def __init__(self, locks: KeyedLock, key: str, ttl: float | None) -> None:
        # KeyedLock fills in the rest when the key is granted (see KeyedLock._grant)
        self._locks = locks
        self.key = key
        self.ttl = ttl
        self._state = _PENDING

    def __repr__(self) -> str:
        if self._state & _PENDING:
            return f"<Lease {self.key!r} not acquired>"
        state = "released" if self.released else "lost" if self.lost else "held"
        return f"<Lease {self.key!r} token={self.token} {state}>"

    @property
    def owner(self) -> bytes:
        """The random 128-bit id of this acquisition."""
        owner = self._owner
        if owner:
            return owner
        # an in-process backend proves ownership by token alone: mint the id only when read
        minted: bytes | None = getattr(self, "_minted_owner", None)
        if minted is None:
            minted = self._minted_owner = new_owner()
        return minted

    @property
    def lost(self) -> bool:
        """True once the lease expired or was taken over: the holder is no longer protected."""
        if self._state & _LOST:
            return True
        expires_at = self.expires_at
        return expires_at is not None and time.time() >= expires_at

    @property
    def released(self) -> bool:
        """True once release() was called."""
        return bool(self._state & _RELEASED)

    # ----------------------------------------------------------------------------- release

    def _renewed(self, expires_at: float) -> None:
        """Record a background renewal (called by backends that auto-renew)."""
        self.expires_at = expires_at
        observer = self._locks._observer
        if observer is not None:
            observer.renewed(observer.prefix_of(self.key))

    def _begin_release(self) -> None:
        state = self._state
        if state & _PENDING:
            raise RuntimeError(f"the lock on {self.key!r} was never acquired: nothing to release")
        if state & _RELEASED:
            raise RuntimeError(f"lease {self.token} on {self.key!r} was already released")
        self._state = state | _RELEASED
        if state & _TRACKED:
            self._locks._backend._untrack(self)

    async def release(self) -> None:
        """Give the key up (to the next waiter, in order); raises LeaseLost if it was lost."""
        self._begin_release()
        backend = self._locks._backend
        try:
            if backend.nonblocking_step:
                backend.release_sync(self._full_key, self._owner, self.token)
            else:
                await backend.release(self._full_key, self._owner, self.token)
        except LeaseLost:
            self._mark_lost()
            raise

    def release_sync(self) -> None:
        """Blocking twin of :meth:`release`."""
        self._begin_release()
        try:
            self._locks._backend.release_sync(self._full_key, self._owner, self.token)
        except LeaseLost:
            self._mark_lost()
            raise

    # ------------------------------------------------------------------------------ extend

    def _extend_ttl(self, ttl: float | None) -> float:
        if self._state & _RELEASED:
            raise RuntimeError(f"lease {self.token} on {self.key!r} was released: cannot extend")
        ttl = check_ttl(ttl if ttl is not None else self.ttl, self.key)
        if ttl is None:
            raise ValueError(
                f"lease on {self.key!r} has no TTL: pass extend(seconds) to give it one"
            )
        return ttl

    async def extend(self, ttl: float | None = None) -> None:
        """Make the lease expire *ttl* seconds from now (default: its own TTL).

        Raises LeaseLost, and marks the lease lost, if it already expired or was taken over.
        """
        ttl = self._extend_ttl(ttl)
        try:
            self.expires_at = await self._locks._backend.extend(
                self._full_key, self._owner, self.token, ttl
            )
        except LeaseLost:
            self._mark_lost()
            raise
        self.ttl = ttl

    def extend_sync(self, ttl: float | None = None) -> None:
        """Blocking twin of :meth:`extend`."""
        ttl = self._extend_ttl(ttl)
        try:
            self.expires_at = self._locks._backend.extend_sync(
                self._full_key, self._owner, self.token, ttl
            )
        except LeaseLost:
            self._mark_lost()
            raise
        self.ttl = ttl

    # ------------------------------------------------------------------------------- loss

    def _mark_lost(self) -> None:
        """Record that the lease is gone: set ``lost``, run ``on_lost``, cancel if asked to.

        Safe to call from any thread, more than once; the callback and cancel run once.
        """
        state = self._state
        if state & _LOST:
            return
        self._state = state | _LOST
        logger.warning("keylock: lease %d on %r was lost", self.token, self.key)
        observer = self._locks._observer
        if observer is not None:
            observer.lost(observer.prefix_of(self.key))
        on_lost = self._locks._on_lost
        if on_lost is not None:
            try:
                on_lost(self)
            except Exception:
                logger.exception("keylock: on_lost callback for %r raised", self.key)
        task: asyncio.Task[object] | None = getattr(self, "_task", None)
        if self._locks._cancel_on_lost and task is not None and not state & _RELEASED:
            self._state |= _CANCELLED_FOR_LOSS
            try:
                task.get_loop().call_soon_threadsafe(task.cancel)
            except RuntimeError:  # loop closed: the section is over anyway
                pass

    # ------------------------------------------------------------------ context management

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state = self._state
        locks = self._locks
        try:
            if state & _SLOW_EXIT or locks._inline_step is None:
                await self.release()
            else:  # the uncontended path: no extra coroutine
                self._state = state | _RELEASED
                locks._release_sync(self._full_key, self._owner, self.token)
        except LeaseLost as lost:
            self._mark_lost()
            _reraise_loss(self, lost, exc)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state = self._state
        try:
            if state & _SLOW_EXIT:
                self.release_sync()
            else:
                self._state = state | _RELEASED
                self._locks._release_sync(self._full_key, self._owner, self.token)
        except LeaseLost as lost:
            self._mark_lost()
            _reraise_loss(self, lost, exc)


def _reraise_loss(lease: Lease, lost: LeaseLost, exc: BaseException | None) -> None:
    """Decide what leaves a ``with`` block whose lease turned out lost on release.

    No error in the body: LeaseLost (the work was not protected). The body was cancelled because
    the lease was lost (``cancel_on_lost``): LeaseLost instead of the cancellation. Any other
    error of the body: that error, with a note that the lease was lost too.
    """
    if exc is None:
        raise lost
    if lease._state & _CANCELLED_FOR_LOSS and isinstance(exc, asyncio.CancelledError):
        task: asyncio.Task[object] | None = getattr(lease, "_task", None)
        if task is not None:
            task.uncancel()
        raise lost from exc
    exc.add_note(f"keylock: the lease on {lease.key!r} was lost as well")
