"""The objects behind ``locks(key)`` and ``locks.sync(key)``: a lease acquired when its block
is entered. ``AsyncHold`` serves only ``async with``, ``SyncHold`` only ``with`` (as asyncio,
trio and anyio locks have no ``__enter__``): the wrong one fails at once, naming the right one.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

from ._validate import MAX_KEY_LENGTH, check_key, check_timeout, check_ttl
from .backends.base import RW_LIMIT, Permits
from .errors import LockTimeout
from .lease import _DONE, _PENDING, _QUEUED, _RELEASED, _SLOW_EXIT, _TRACKED, Lease, new_owner

if TYPE_CHECKING:
    from collections.abc import Awaitable
    from types import FrameType, TracebackType

    from .backends.base import Grant

__all__ = ["AsyncHold", "SyncHold"]

_frame = sys._getframe  # the frame entering a block: what a re-entry is recognised by


class _Hold(Lease):
    """The lease behind ``locks(key)`` / ``locks.sync(key)``: acquired when the block is entered.

    One block per object (as ``asyncio.timeout``): call ``locks(key)`` again for the next one.
    """

    __slots__ = ("_timeout",)

    _timeout: float | None

    def _enter_once(self) -> None:
        raise RuntimeError(
            f"keylock: this locks({self.key!r}) block was already entered: "
            "write a new locks(key) for each block"
        )

    def _enter(self, depth: int = 1) -> Lease | None:
        """Enter the block: the lease once held, or None for an async hold that must wait
        (its ``__aenter__`` waits). The frame *depth* calls up is the one entering the block:
        a wait from inside that same block (the same task or thread asking again) raises
        RuntimeError instead of never ending. ``SyncHold.__enter__`` is this very function
        (no frame in between); ``AsyncHold.__aenter__`` calls it after its own copy of the
        claim of a free key."""
        holder = _frame(depth)
        if self._state is not _PENDING:  # (a small int: identity is equality, and cheaper)
            self._enter_once()
        key = self.key
        host = self._host
        if (  # (check_key's rules, inlined: this is the uncontended hot path)
            self.ttl is None
            and self._timeout is None
            and type(key) is str
            and key  # (not empty)
            and len(key) <= MAX_KEY_LENGTH
            and "\x00" not in key
        ):
            claim = host.claim
            if claim is not None:  # a MemoryBackend lock: see MemoryBackend.free_claim
                entry = [0, None, None, False, b"", None, holder]
                if claim(key, entry) is entry:
                    self.token = entry[0] = host.mint()
                    self.took_over = False  # (a lapsed record would have kept the key)
                    self._full_key = key
                    self._owner = b""
                    self.expires_at = self._deadline = None
                    self._state = 0
                    return self
            elif (plain := host.plain) is not None:
                grant = plain(key, b"", None, None, holder)
                if grant is not None:  # uncontended: nothing else to resolve
                    self._full_key = key
                    self._owner = b""
                    self.token = grant[0]
                    self.took_over = grant[3]  # an untimed lease may follow a timed one
                    self.expires_at = self._deadline = None
                    self._state = 0
                    return self
        return self._enter_step(key, holder)

    def _enter_step(self, key: str, holder: FrameType) -> Lease | None:
        """``_enter`` beyond an uncontended untimed grant: the arguments checked and resolved,
        one non-blocking step of the backend, then ``_queue`` if that did not grant the key."""
        host = self._host
        key = self.key = check_key(key)
        if self._timeout is not None:
            self._timeout = check_timeout(self._timeout, key)
        if self.ttl is not None:
            self.ttl = check_ttl(self.ttl, key)
        elif host.default_ttl is not None:
            self.ttl = host.default_ttl
        full = self._full_key = host.prefix + key
        owner = self._owner = new_owner() if host.needs_owner else b""
        step = host.step
        if step is not None and (grant := step(full, owner, self.ttl, None, holder)) is not None:
            self._state = 0
            self._held(grant)
            return self
        return self._queue(holder)

    def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release the key at the block's end (as ``Lease.__exit__``); a MemoryBackend's
        untimed lease is released right here (see ``MemoryBackend.free_release``).
        ``SyncHold.__exit__`` is this function, and the exit of an ``AsyncHold`` whose release
        never waits (an inline backend's) runs it too: the one release of both."""
        state = self._state
        free = self._host.free_release
        if free is not None and state < _SLOW_EXIT:
            lock, unlock, entries, hand_off = free
            key = self._full_key
            lock()
            try:
                entry = entries.get(key)
                # its own record (the token object itself: tokens never repeat), untimed (so
                # it cannot have lapsed, nor its owner changed): released, as release_sync would
                if entry is not None and entry[0] is self.token and entry[2] is None:
                    self._state = state + _RELEASED
                    if entry[5]:
                        hand_off(key, entry)
                    else:
                        del entries[key]
                    return
            finally:
                unlock()
        Lease.__exit__(self, exc_type, exc, tb)

    def _queue(self, holder: FrameType) -> Lease | None:
        raise NotImplementedError

    def _held(self, grant: Grant) -> None:
        """Record the grant; a lease with a TTL is shown to the backend (auto-renew)."""
        self._granted(grant)
        if self.ttl is not None:
            self._state |= _TRACKED
            self._host.backend._track(self)


class AsyncHold(_Hold):
    """``locks(key)``: for ``async with`` only."""

    __slots__ = ()

    async def __aenter__(self) -> Lease:
        # _enter's claim of a free key, copied (keep the two alike): calling _enter first
        # costs the async block ~12% of its time (a median of 1.33 us against 1.15 us), which
        # would take it near its budget of 3x a bare asyncio.Lock
        claim = self._host.claim
        key = self.key
        if (
            claim is not None
            and self._state is _PENDING
            and self.ttl is None
            and self._timeout is None
            and type(key) is str
            and key  # (not empty)
            and len(key) <= MAX_KEY_LENGTH
            and "\x00" not in key
        ):
            entry = [0, None, None, False, b"", None, _frame(1)]
            if claim(key, entry) is entry:
                self.token = entry[0] = self._host.mint()
                self.took_over = False
                self._full_key = key
                self._owner = b""
                self.expires_at = self._deadline = None
                self._state = 0
                return self
        if self._enter(2) is None:
            # (_wait inlined: one coroutine frame less per queued waiter, 256 bytes of a crowd's
            # 10,000)
            host = self._host
            grant = await host.backend.acquire(
                self._full_key, self._owner, timeout=self._timeout, ttl=self.ttl, holder=_frame(1)
            )
            self._state = _QUEUED if host.inline else 0
            self._held(grant)
        return self

    def _exit_async(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[None]:
        # (as Lease's: a release that never waits makes no coroutine; here it is _exit's)
        if self._host.inline:
            self._exit(exc_type, exc, tb)
            return _DONE
        return self._aexit(exc)

    if not TYPE_CHECKING:
        __aexit__ = _exit_async

    def _queue(self, holder: FrameType) -> None:
        return None  # (the wait is a coroutine: __aenter__ awaits it)

    async def _wait(self, holder: FrameType) -> None:
        host = self._host
        grant = await host.backend.acquire(
            self._full_key, self._owner, timeout=self._timeout, ttl=self.ttl, holder=holder
        )
        self._state = _QUEUED if host.inline else 0
        self._held(grant)

    def _held(self, grant: Grant) -> None:
        if self.ttl is not None:
            self._task = asyncio.current_task()  # (cancel_on_lost cancels this task)
        _Hold._held(self, grant)

    def __enter__(self) -> Lease:
        used, twin = _forms(self)
        raise TypeError(
            f"{used}({self.key!r}) is for 'async with' in a coroutine; in sync code or a thread "
            f"use 'with {twin}({self.key!r})'"
        )


class SyncHold(_Hold):
    """``locks.sync(key)``: for ``with`` only."""

    __slots__ = ()

    if TYPE_CHECKING:

        def __enter__(self) -> Lease: ...

        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None: ...

    else:
        __enter__ = _Hold._enter
        __exit__ = _Hold._exit

    def _queue(self, holder: FrameType) -> Lease:
        self._wait(holder)
        return self

    def _wait(self, holder: FrameType) -> None:
        host = self._host
        timeout = self._timeout
        # on a thread running an event loop, waiting would stop the loop: only a try
        on_loop = timeout != 0 and asyncio._get_running_loop() is not None
        if on_loop and host.inline:  # (the inline step just tried)
            raise _blocking(self)
        try:
            grant = host.backend.acquire_sync(
                self._full_key,
                self._owner,
                timeout=0 if on_loop else timeout,
                ttl=self.ttl,
                holder=holder,
            )
        except LockTimeout:
            if on_loop:
                raise _blocking(self) from None
            raise
        self._state = _QUEUED if host.inline else 0
        self._held(grant)

    async def __aenter__(self) -> Lease:
        twin, used = _forms(self)
        raise TypeError(
            f"{used}({self.key!r}) is for 'with' in sync code; in a coroutine use "
            f"'async with {twin}({self.key!r})', which waits without blocking the event loop"
        )


def _blocking(hold: _Hold) -> RuntimeError:
    """A sync acquire that would have to wait on a thread running an event loop: waiting
    would stop that loop, and never end if a task of that loop holds the key."""
    key = hold.key
    used, twin = _forms(hold)[::-1]
    return RuntimeError(
        f"keylock: {used}({key!r}) would block this thread's running event loop while it "
        f"waits (and never return if a task on that loop holds {key!r}); in a coroutine use "
        f"'async with {twin}({key!r})', or run the sync code in a thread (asyncio.to_thread)"
    )


def _forms(hold: _Hold) -> tuple[str, str]:
    """(async form, sync form) of the call that made *hold*, for messages: an RW lock's read
    or write twin, a semaphore's, or a lock's (advising ``locks.sync`` for ``rw.read`` would
    take the write lock)."""
    shape = getattr(hold._host.backend, "shape", None)
    if not isinstance(shape, Permits):
        return "locks", "locks.sync"
    if shape.limit != RW_LIMIT:
        return "sem", "sem.sync"
    if shape.weight == RW_LIMIT:
        return "rw.write", "rw.write_sync"
    return "rw.read", "rw.read_sync"
