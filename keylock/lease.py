"""Lease: one granted hold on one key, with its fencing token; released once, by its holder."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from ._validate import check_ttl
from .errors import LeaseLost

if TYPE_CHECKING:
    from .backends.base import Backend, Grant

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


class Lease:
    """A hold on ``key``: exclusive while live; ``token`` fences writes made under it.

    ``lost`` becomes true when the lease expired or was taken over; from then on the holder is
    no longer protected and must reconcile rather than act. ``release()`` on a lost lease raises
    :class:`~keylock.LeaseLost`. A lease belongs to its acquisition, not to a task or thread:
    whoever holds this object may release it, exactly once.
    """

    __slots__ = (
        "__weakref__",
        "_backend",
        "_cancel_on_lost",
        "_cancelled_for_loss",
        "_full_key",
        "_lost",
        "_on_lost",
        "_released",
        "_task",
        "_tracked",
        "expires_at",
        "key",
        "owner",
        "token",
        "ttl",
    )

    def __init__(
        self,
        backend: Backend,
        key: str,
        full_key: str,
        owner: bytes,
        grant: Grant,
        ttl: float | None,
        *,
        on_lost: LostCallback | None = None,
        cancel_on_lost: bool = False,
    ) -> None:
        self.key = key  #: the key as the caller named it (without namespace)
        self.token = grant.token  #: fencing token: strictly increasing per key
        self.owner = owner  #: random 128-bit id of this acquisition
        self.expires_at = grant.expires_at  #: time.time() when the lease lapses; None = never
        self.ttl = ttl  #: lease length used by extend() and auto-renew
        self._backend = backend
        self._full_key = full_key
        self._released = False
        self._lost = False
        self._on_lost = on_lost
        self._cancel_on_lost = cancel_on_lost
        self._cancelled_for_loss = False
        self._task: asyncio.Task[object] | None = None
        self._tracked = False

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self.lost else "held"
        return f"<Lease {self.key!r} token={self.token} {state}>"

    @property
    def lost(self) -> bool:
        """True once the lease expired or was taken over: the holder is no longer protected."""
        if self._lost:
            return True
        expires_at = self.expires_at
        return expires_at is not None and time.time() >= expires_at

    @property
    def released(self) -> bool:
        """True once release() was called."""
        return self._released

    # ----------------------------------------------------------------------------- release

    def _begin_release(self) -> None:
        if self._released:
            raise RuntimeError(f"lease {self.token} on {self.key!r} was already released")
        self._released = True
        if self._tracked:
            self._backend._untrack(self)

    async def release(self) -> None:
        """Give the key up (to the next waiter, in order); raises LeaseLost if it was lost."""
        self._begin_release()
        backend = self._backend
        try:
            if backend.nonblocking_step:
                backend.release_sync(self._full_key, self.owner, self.token)
            else:
                await backend.release(self._full_key, self.owner, self.token)
        except LeaseLost:
            self._mark_lost()
            raise

    def release_sync(self) -> None:
        """Blocking twin of :meth:`release`."""
        self._begin_release()
        try:
            self._backend.release_sync(self._full_key, self.owner, self.token)
        except LeaseLost:
            self._mark_lost()
            raise

    # ------------------------------------------------------------------------------ extend

    def _extend_ttl(self, ttl: float | None) -> float:
        if self._released:
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
            self.expires_at = await self._backend.extend(
                self._full_key, self.owner, self.token, ttl
            )
        except LeaseLost:
            self._mark_lost()
            raise
        self.ttl = ttl

    def extend_sync(self, ttl: float | None = None) -> None:
        """Blocking twin of :meth:`extend`."""
        ttl = self._extend_ttl(ttl)
        try:
            self.expires_at = self._backend.extend_sync(
                self._full_key, self.owner, self.token, ttl
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
        if self._lost:
            return
        self._lost = True
        logger.warning("keylock: lease %d on %r was lost", self.token, self.key)
        if self._on_lost is not None:
            try:
                self._on_lost(self)
            except Exception:
                logger.exception("keylock: on_lost callback for %r raised", self.key)
        task = self._task
        if self._cancel_on_lost and task is not None and not self._released:
            self._cancelled_for_loss = True
            loop = task.get_loop()
            try:
                loop.call_soon_threadsafe(task.cancel)
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
        try:
            await self.release()
        except LeaseLost as lost:
            _reraise_loss(self, lost, exc)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.release_sync()
        except LeaseLost as lost:
            _reraise_loss(self, lost, exc)


def _reraise_loss(lease: Lease, lost: LeaseLost, exc: BaseException | None) -> None:
    """Decide what leaves a ``with`` block whose lease turned out lost on release.

    No error in the body: LeaseLost (the work was not protected). The body was cancelled because
    the lease was lost (``cancel_on_lost``): LeaseLost instead of the cancellation. Any other
    error of the body: that error, with a note that the lease was lost too.
    """
    if exc is None:
        raise lost
    if lease._cancelled_for_loss and isinstance(exc, asyncio.CancelledError):
        task = lease._task
        if task is not None:
            task.uncancel()
        raise lost from exc
    exc.add_note(f"keylock: the lease on {lease.key!r} was lost as well")
