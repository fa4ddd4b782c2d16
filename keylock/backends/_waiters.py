"""The two ways a caller waits for a key: a thread on a latch, a task on a future.

Both kinds sit in one backend's queue, which is how sync and async callers of one key, and
callers on several event loops, exclude each other. ``wake`` may come from any thread.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import math
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType

    from .base import Grant

__all__ = ["LoopWaiter", "ThreadWaiter", "Waiter", "on_this_stack", "reentry_error"]


class Waiter(abc.ABC):
    """A caller waiting for a key; the backend hands it a grant or wakes it to try again."""

    __slots__ = ("grant", "holder", "owner", "retry_at", "ttl")

    def __init__(self, owner: bytes, ttl: float | None, holder: FrameType | None = None) -> None:
        self.owner = owner
        self.ttl = ttl
        self.holder = holder  # the frame whose block will hold the key (see Backend._try_acquire)
        self.grant: Grant | None = None  # set once, by the backend that hands the key over
        self.retry_at = math.inf  # time.monotonic() at which to run the step again unwoken

    def prepare(self) -> None:
        """Arm for the next wake-up; call before re-reading the state, so a wake-up that comes
        between the read and the wait is not lost."""

    @abc.abstractmethod
    def wake(self) -> bool:
        """Wake the waiting caller; callable from any thread, any number of times.

        False when nobody is left to wake (the caller's event loop is closed): a backend then
        passes a key it just handed over on to the next waiter.
        """


class ThreadWaiter(Waiter):
    """Waits by blocking the calling thread on a ``threading.Lock`` that ``wake`` releases."""

    __slots__ = ("_signal",)

    def __init__(self, owner: bytes, ttl: float | None, holder: FrameType | None = None) -> None:
        super().__init__(owner, ttl, holder)
        self._signal = threading.Lock()
        self._signal.acquire()  # held = armed; wake() releases it

    def wake(self) -> bool:
        try:
            self._signal.release()
        except RuntimeError:  # already woken and not yet waited for
            pass
        return True

    def prepare(self) -> None:
        """Arm for the next wake-up; call before re-reading the state (a no-op: the lock latch
        stays released until the next wait takes it, so no wake-up is lost)."""

    def wait(self, timeout: float | None) -> None:
        """Block until woken (since the last wait) or *timeout* seconds pass."""
        if timeout is None:
            self._signal.acquire()
        else:
            # threading's own bound: a longer wait is cut and the caller simply looks again
            self._signal.acquire(timeout=min(max(timeout, 0.0), threading.TIMEOUT_MAX))


class LoopWaiter(Waiter):
    """Waits on a future of the caller's event loop; ``wake`` may come from any thread."""

    __slots__ = ("_future", "_loop", "_thread")

    def __init__(self, owner: bytes, ttl: float | None, holder: FrameType | None = None) -> None:
        self.owner = owner
        self.ttl = ttl
        self.holder = holder
        self.grant = None
        self.retry_at = math.inf
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._future: asyncio.Future[None] = self._loop.create_future()

    def wake(self) -> bool:
        if threading.get_ident() == self._thread and not self._loop.is_closed():
            self._set()
            return True
        try:
            self._loop.call_soon_threadsafe(self._set)
        except RuntimeError:  # the waiter's loop is closed: nobody is left to wake
            return False
        return True

    def _set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def prepare(self) -> None:
        """Arm for the next wake-up; call before re-reading the state, so a wake-up that comes
        between the read and the wait is not lost."""
        if self._future.done():
            self._future = self._loop.create_future()

    async def wait(self, timeout: float | None) -> None:
        """Wait until woken (since the last prepare) or *timeout* seconds pass."""
        future = self._future
        if timeout is None:
            await future
            return
        # The timer wakes the waiter as a wake-up would (the caller looks again either way):
        # no coroutine, set or callbacks per wait as asyncio.wait makes, which is most of a
        # queued waiter's memory in a crowd. Setting, not cancelling, the future at the
        # timeout keeps a wake-up that lands just after harmless.
        timer = self._loop.call_later(max(timeout, 0.0), self._set)
        try:
            await future
        finally:
            timer.cancel()


# Code flags of functions whose frames can be suspended (coroutines, generators): such a
# frame with no caller is parked, so it cannot be on the current stack.
_SUSPENDABLE = inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def on_this_stack(frame: FrameType) -> bool:
    """True when *frame* is running below the caller on this thread's stack: the caller is
    inside the block that frame entered (the same task, or the same thread)."""
    if frame.f_back is None and frame.f_code.co_flags & _SUSPENDABLE:
        return False  # a parked coroutine: another task's block (the cheap, common case)
    current: FrameType | None = sys._getframe(1)
    while current is not None:
        if current is frame:
            return True
        current = current.f_back
    return False


def reentry_error(key: str) -> RuntimeError:
    """The error for a block that asks again for a key its own task or thread holds."""
    shown = key.replace("\x00", ":")  # (a namespace is stored NUL-separated)
    return RuntimeError(
        f"keylock: {shown!r} is already held by an enclosing block of this same task or "
        "thread; keylock locks are not reentrant, so this wait would never end. Do the "
        "inner work inside the block you hold (pass the lease down), or lock a different key"
    )
