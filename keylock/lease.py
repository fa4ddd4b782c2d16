"""Lease: one granted hold on one key, with its fencing token; released once, by its holder."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
from typing import TYPE_CHECKING

from ._host import LostCallback, deliver, report
from ._validate import check_ttl
from .errors import BackendUnavailable, LeaseLost

if TYPE_CHECKING:
    from collections.abc import Awaitable
    from types import TracebackType

    from ._host import LeaseHost
    from .backends.base import Grant

__all__ = ["Lease", "LostCallback"]

logger = logging.getLogger("keylock")

# Owner ids: 128 random bits from a private generator seeded by the OS (a user's random.seed()
# must not make two processes mint the same ids), reseeded in forked children.
_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)


def new_owner() -> bytes:
    """A fresh random 128-bit owner id."""
    return _rng.getrandbits(128).to_bytes(16)


# Lease._state bits. A lease's bits change on its holder's thread, except _LOST, which a
# backend's background thread may set: every change of a lease that such a thread can see
# (a tracked lease) happens under _STATE, so no bit is lost to a racing read-modify-write.
_LOST = 1  # keylock learned the lease was lost; final
_CANCELLED_FOR_LOSS = 2  # its task was cancelled because the lease was lost
_QUEUED = 4  # granted after waiting in the queue (an observer counts it as a hand-off)
_TOLD = 8  # the holder's hooks (on_lost, observer, cancel) ran or are on their way
# From here up, the bits that make a release need more than the backend call: the exit tests
# ``state >= _SLOW_EXIT`` and sets ``state + _RELEASED`` (int ops cheaper than bit masks).
_SLOW_EXIT = _RELEASED = 16  # release() was called
_TRACKED = 32  # the backend looks after it (auto-renew) until release
_PENDING = 64  # not granted yet (a ``locks(key)`` block not entered yet)
_STATE = threading.Lock()
os.register_at_fork(after_in_child=_STATE._at_fork_reinit)  # type: ignore[attr-defined]


class _NoLoop:
    """The loop of ``_DONE``: a future that is already done never uses its loop when awaited."""

    def get_debug(self) -> bool:
        return False


# What an uncontended ``__aexit__`` returns: awaiting a done future costs no frame.
_DONE: asyncio.Future[None] = asyncio.Future(loop=_NoLoop())  # type: ignore[arg-type]
_DONE.set_result(None)


class Lease:
    """A hold on ``key``: exclusive while live; ``token`` fences writes made under it.

    ``lost`` becomes true when the lease expired or was taken over, and stays true: from then
    on the holder is no longer protected and must reconcile rather than act. ``release()`` on a
    lost lease raises :class:`~keylock.LeaseLost`. A lease belongs to its acquisition, not to a
    task or thread: whoever holds this object may release it, exactly once.
    """

    __slots__ = (
        "__weakref__",
        "_deadline",  # host.clock.monotonic() when the lease lapses; None = never
        "_full_key",
        "_host",
        "_minted_owner",  # owner id shown to users of backends that need none; set when read
        "_owner",
        "_state",
        "_task",  # the holder's task, set only for async leases with a TTL (cancel_on_lost)
        "expires_at",
        "key",
        "token",
        "took_over",
        "ttl",
    )

    key: str  #: the key as the caller named it (without namespace)
    token: int  #: fencing token: strictly increasing per key, never reused
    #: True when this grant followed a lease that ended without its holder's release while
    #: live: it expired (its holder died, froze, or lost it), or an operator force-released it
    #: (``keylock release --force``); what that holder did may be half done, so reconcile or
    #: compensate once. False for a key never locked and after a clean release. Every backend
    #: records it (File in the lock file, until :meth:`FileBackend.prune` removes the file;
    #: Redis for a day after the lease's end; Postgres in the key's row).
    took_over: bool
    expires_at: float | None  #: time.time() when the lease lapses (for display); None = never
    ttl: float | None  #: lease length used by extend() and auto-renew; None = no expiry
    _full_key: str  # the key as the backend knows it (namespace encoded in)
    _owner: bytes  # the owner id the backend knows (b"" when the token alone proves ownership)
    _deadline: float | None
    _host: LeaseHost
    _state: int

    def __repr__(self) -> str:
        if self._state & _PENDING:
            return f"<Lease {self.key!r} not acquired>"
        state = "released" if self.released else "lost" if self.lost else "held"
        return f"<Lease {self.key!r} token={self.token} {state}>"

    def _granted(self, grant: Grant) -> None:
        self.token = grant[0]
        self.expires_at = grant[1]
        self._deadline = grant[2]
        self.took_over = grant[3]

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
        """True once the lease expired or was taken over (judged on the monotonic clock, so a
        step of the wall clock changes nothing); once true, it stays true."""
        state = self._state
        if state & _LOST:
            return True
        deadline = self._deadline
        if deadline is None or self._host.clock.monotonic() < deadline:
            return False
        with _STATE:  # a renewal that lands after this instant no longer revives it
            self._state |= _LOST
        return True

    @property
    def _shown_key(self) -> str:
        # as errors name it: "namespace:key" (the backend's key joins them with NUL)
        return self._full_key.replace("\x00", ":")

    @property
    def released(self) -> bool:
        """True once release() was called."""
        return bool(self._state & _RELEASED)

    # ---------------------------------------------- the backend's seam (any thread, at once)

    def _on_renewed(self, grant: Grant) -> None:
        """A background renewal succeeded: *grant* carries the new dates. Returns at once,
        never raises; ignored once the lease is released or lost (lost is final)."""
        with _STATE:
            if self._state & (_LOST | _RELEASED):
                return
            self.expires_at = grant[1]
            self._deadline = grant[2]
        observer = self._host.observer
        if observer is not None:
            prefix = observer.prefix_of(self.key)
            deliver(lambda: report("Observer.renewed", lambda: observer.renewed(prefix)), None)

    def _on_lost(self) -> None:
        """The backend learned the lease is gone. Returns at once, never raises: ``on_lost``,
        the observer and ``cancel_on_lost`` run on the holder's loop (or keylock's callback
        thread), once."""
        if self._set_lost():
            task: asyncio.Task[object] | None = getattr(self, "_task", None)
            loop = None if task is None else task.get_loop()
            deliver(lambda: self._report_lost(cancel=True), loop)

    def _lost_here(self) -> None:
        """The holder's own call found the lease lost: tell its hooks now, on this thread."""
        if self._set_lost():
            self._report_lost(cancel=False)

    def _set_lost(self) -> bool:
        """Mark the lease lost (final); True for the one call that must tell the holder."""
        with _STATE:
            state = self._state
            self._state = state | _LOST | _TOLD
        return not state & _TOLD

    def _report_lost(self, *, cancel: bool) -> None:
        """Tell the holder: log, observer, on_lost, then cancel its block if asked to (decided
        here, on the holder's loop, so a block that already ended is never cancelled)."""
        logger.warning("keylock: lease %d on %r was lost", self.token, self._shown_key)
        host = self._host
        observer = host.observer
        if observer is not None:
            report("Observer.lost", lambda: observer.lost(observer.prefix_of(self.key)))
        on_lost = host.on_lost
        if on_lost is not None:
            report("on_lost callback", lambda: on_lost(self))
        task: asyncio.Task[object] | None = getattr(self, "_task", None)
        if cancel and host.cancel_on_lost and task is not None and not task.done():
            with _STATE:
                if self._state & _RELEASED:
                    return
                self._state |= _CANCELLED_FOR_LOSS
            task.cancel()

    # ----------------------------------------------------------------------------- release

    def _begin_release(self) -> None:
        with _STATE:
            state = self._state
            if state & _PENDING:
                raise RuntimeError(
                    f"the lock on {self.key!r} was never acquired: nothing to release"
                )
            if state & _RELEASED:
                raise RuntimeError(
                    f"lease {self.token} on {self._shown_key!r} was already released: a lease "
                    "is released once (a with block releases it on exit); acquire the key "
                    "again to hold it"
                )
            self._state = state | _RELEASED
        if state & _TRACKED:
            self._host.backend._untrack(self)

    def _after_release(self) -> None:
        """A release the backend accepted still reports a loss already seen (lost is final)."""
        if self._state & _LOST:
            raise LeaseLost(
                f"lease {self.token} on {self.key!r} was lost before its release (its TTL ran "
                "out or a renewal failed): the critical section was not protected",
                key=self.key,
            )

    async def release(self) -> None:
        """Give the key up (to the next waiter, in order); raises LeaseLost if it was lost.

        Once started, a release completes even if the caller is cancelled meanwhile."""
        self._begin_release()
        backend = self._host.backend
        try:
            if self._host.inline:
                backend.release_sync(self._full_key, self._owner, self.token)
            else:
                await backend.release(self._full_key, self._owner, self.token)
        except LeaseLost:
            self._lost_here()
            raise
        self._after_release()

    def release_sync(self) -> None:
        """Blocking twin of :meth:`release`."""
        self._begin_release()
        try:
            self._host.backend.release_sync(self._full_key, self._owner, self.token)
        except LeaseLost:
            self._lost_here()
            raise
        self._after_release()

    # ------------------------------------------------------------------------------ extend

    def _extend_ttl(self, ttl: float | None) -> float:
        if self._state & _RELEASED:
            raise RuntimeError(
                f"lease {self.token} on {self._shown_key!r} was released: cannot extend it; "
                "acquire the key again to hold it"
            )
        ttl = check_ttl(ttl if ttl is not None else self.ttl, self.key)
        if ttl is None:
            raise ValueError(
                f"lease on {self.key!r} has no TTL: pass extend(seconds) to give it one"
            )
        if self.lost:
            self._lost_here()
            raise LeaseLost(
                f"lease {self.token} on {self.key!r} was lost (its TTL ran out): it cannot be "
                "extended; reconcile before acting",
                key=self.key,
            )
        return ttl

    def _extended(self, grant: Grant, ttl: float) -> None:
        with _STATE:
            self.expires_at = grant[1]
            self._deadline = grant[2]
            self.ttl = ttl
        if self._state & _TRACKED:  # auto-renew follows the new length at once
            self._host.backend._track(self)

    async def extend(self, ttl: float | None = None) -> None:
        """Make the lease expire *ttl* seconds from now (default: its own TTL); auto-renew
        follows the new length. Raises LeaseLost, and marks the lease lost, if it already
        expired or was taken over."""
        ttl = self._extend_ttl(ttl)
        try:
            grant = await self._host.backend.extend(self._full_key, self._owner, self.token, ttl)
        except LeaseLost:
            self._lost_here()
            raise
        self._extended(grant, ttl)

    def extend_sync(self, ttl: float | None = None) -> None:
        """Blocking twin of :meth:`extend`."""
        ttl = self._extend_ttl(ttl)
        try:
            grant = self._host.backend.extend_sync(self._full_key, self._owner, self.token, ttl)
        except LeaseLost:
            self._lost_here()
            raise
        self._extended(grant, ttl)

    # ------------------------------------------------------------------ context management

    def _exit_async(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[None]:
        # ``__aexit__`` at run time: a plain function, so the uncontended exit (a release that
        # never waits) makes no coroutine: it releases here and returns a done awaitable.
        state = self._state
        host = self._host
        if state >= _SLOW_EXIT or not host.inline:
            return self._aexit(exc)
        try:
            self._state = state + _RELEASED
            release = host.release  # (an attribute load: a method load of a slot is slower)
            release(self._full_key, self._owner, self.token)
        except (LeaseLost, BackendUnavailable) as error:
            _exit_failed(self, error, exc)
        return _DONE

    if TYPE_CHECKING:  # what ``async with`` protocols expect to see

        async def __aexit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None: ...

    else:
        __aexit__ = _exit_async

    async def _aexit(self, exc: BaseException | None) -> None:
        try:
            await self.release()
        except (LeaseLost, BackendUnavailable) as error:
            _exit_failed(self, error, exc)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state = self._state
        try:
            if state >= _SLOW_EXIT:
                self.release_sync()
            else:
                self._state = state + _RELEASED
                release = self._host.release
                release(self._full_key, self._owner, self.token)
        except (LeaseLost, BackendUnavailable) as error:
            _exit_failed(self, error, exc)


def _exit_failed(
    lease: Lease, error: LeaseLost | BackendUnavailable, exc: BaseException | None
) -> None:
    """The release ending *lease*'s block (whose body raised *exc*) raised *error*."""
    if isinstance(error, LeaseLost):
        lease._lost_here()
        _reraise_loss(lease, error, exc)
    else:
        _reraise_unavailable(lease, error, exc)


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


def _reraise_unavailable(
    lease: Lease, unavailable: BackendUnavailable, exc: BaseException | None
) -> None:
    """The release at the end of a block failed to reach the store. If the lease was already
    known lost, the holder must hear LeaseLost (its section was not protected); else the
    release error, or the body's own error with a note."""
    if lease._state & _LOST:
        lost = LeaseLost(
            f"lease {lease.token} on {lease.key!r} was lost, and its release could not reach "
            "the store either: the critical section was not protected",
            key=lease.key,
        )
        lost.__cause__ = unavailable
        _reraise_loss(lease, lost, exc)
        return
    if exc is None:
        raise unavailable
    exc.add_note(f"keylock: releasing {lease.key!r} failed too: {unavailable}")
