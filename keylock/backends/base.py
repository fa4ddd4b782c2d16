"""The one backend protocol: a non-blocking step per backend, and the two ways to wait for it.

A backend writes its *step* once (``_try_acquire``: grant now, or register a waiter and
return). The async and sync drivers here differ only in how they wait: a :class:`LoopWaiter`
(a future on the caller's event loop, woken thread-safely) or a :class:`ThreadWaiter` (a
``threading.Lock`` released by the waker). Both kinds can sit in one backend's queue, which is
how sync and async callers of one key, and callers on several event loops, exclude each other.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from ..errors import LockTimeout

if TYPE_CHECKING:
    from ..lease import Lease

__all__ = [
    "Backend",
    "Grant",
    "KeyStatistics",
    "LoopWaiter",
    "ThreadWaiter",
    "Waiter",
]


class Grant(NamedTuple):
    """One granted lease as the backend sees it: its fencing token and wall-clock expiry.

    Read by index (``grant[0]``, ``grant[1]``) on the hot path, so a backend may return any
    sequence laid out the same way (the memory backend returns its entry record).
    """

    token: int  # strictly increasing per key, never reused
    expires_at: float | None  # time.time() after which the lease is void; None = never


@dataclass(frozen=True, slots=True)
class KeyStatistics:
    """A snapshot of one key: who holds it and how many wait (for debugging and tests)."""

    key: str
    held: bool
    token: int | None
    owner: bytes | None
    waiting: int


class Waiter(abc.ABC):
    """A caller waiting for a key; the backend hands it a grant or wakes it to try again."""

    __slots__ = ("grant", "owner", "retry_at", "ttl")

    def __init__(self, owner: bytes, ttl: float | None) -> None:
        self.owner = owner
        self.ttl = ttl
        self.grant: Grant | None = None  # set once, by the backend that hands the key over
        self.retry_at = math.inf  # time.monotonic() at which to run the step again unwoken

    @abc.abstractmethod
    def wake(self) -> None:
        """Wake the waiting caller; callable from any thread, any number of times."""


class ThreadWaiter(Waiter):
    """Waits by blocking the calling thread on a ``threading.Lock`` that ``wake`` releases."""

    __slots__ = ("_signal",)

    def __init__(self, owner: bytes, ttl: float | None) -> None:
        super().__init__(owner, ttl)
        self._signal = threading.Lock()
        self._signal.acquire()  # held = armed; wake() releases it

    def wake(self) -> None:
        try:
            self._signal.release()
        except RuntimeError:  # already woken and not yet waited for
            pass

    def prepare(self) -> None:
        """Arm for the next wake-up; call before re-reading the state (a no-op: the lock latch
        stays released until the next wait takes it, so no wake-up is lost)."""

    def wait(self, timeout: float | None) -> None:
        """Block until woken (since the last wait) or *timeout* seconds pass."""
        self._signal.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))


class LoopWaiter(Waiter):
    """Waits on a future of the caller's event loop; ``wake`` may come from any thread."""

    __slots__ = ("_future", "_loop", "_thread")

    def __init__(self, owner: bytes, ttl: float | None) -> None:
        self.owner = owner
        self.ttl = ttl
        self.grant = None
        self.retry_at = math.inf
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._future: asyncio.Future[None] = self._loop.create_future()

    def wake(self) -> None:
        if threading.get_ident() == self._thread:
            self._set()
        else:
            try:
                self._loop.call_soon_threadsafe(self._set)
            except RuntimeError:  # the waiter's loop is closed: nobody is left to wake
                pass

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
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await future
        except TimeoutError:
            pass


class Backend(abc.ABC):
    """Per-key exclusive leases.

    Guarantees every backend must meet (the conformance suite checks each of them):

    * at most one live lease per key; a lease is live until released or until its TTL runs out;
    * tokens strictly increase per key over all grants, by all clients, and are never reused;
    * a waiter that times out or is cancelled leaves no grant and no queue entry behind, even
      when the grant raced the cancel (a grant handed to it is passed on);
    * only the holder of a lease (its token and owner) can release or extend it; releasing or
      extending a lost lease raises :class:`~keylock.LeaseLost`;
    * per-key state exists only while the key is held or awaited.

    A subclass implements the non-blocking step and the release/extend primitives; the blocking
    acquire in both flavours is written here, once.
    """

    #: True when the step only touches local state and may run straight on an event loop.
    nonblocking_step: bool = True
    #: TTL applied when the caller passes ``ttl=None``.
    default_ttl: float | None = None
    #: False when the token alone proves ownership (in-process): owner ids are then minted
    #: only if someone reads ``lease.owner``, and the backend is passed ``b""``.
    needs_owner: bool = True

    # ----------------------------------------------------------------- the step, per backend

    @abc.abstractmethod
    def _try_acquire(
        self, key: str, owner: bytes, ttl: float | None, waiter: Waiter | None
    ) -> Grant | None:
        """Grant *key* now, or register *waiter* (idempotently) and return None. Never blocks.

        When it registers the waiter, the backend either hands it a grant later (``waiter.grant``
        then ``wake()``), or wakes it to run the step again; ``waiter.retry_at`` says when to run
        the step again if no wake-up comes (a holder's TTL running out, a safety-net poll).
        """

    @abc.abstractmethod
    def _withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        """Remove *waiter* from *key*'s queue; return a grant already handed to it, if any."""

    async def _try_acquire_async(
        self, key: str, owner: bytes, ttl: float | None, waiter: Waiter | None
    ) -> Grant | None:
        """The step for async callers; backends whose step does I/O override it."""
        return self._try_acquire(key, owner, ttl, waiter)

    @abc.abstractmethod
    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        """Release the lease *token* on *key*; raises LeaseLost if it was no longer live."""

    async def release(self, key: str, owner: bytes, token: int) -> None:
        """Release the lease *token* on *key*; raises LeaseLost if it was no longer live."""
        self.release_sync(key, owner, token)

    @abc.abstractmethod
    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> float:
        """Make the live lease *token* expire *ttl* seconds from now; return the new expiry."""

    async def extend(self, key: str, owner: bytes, token: int, ttl: float) -> float:
        """Make the live lease *token* expire *ttl* seconds from now; return the new expiry."""
        return self.extend_sync(key, owner, token, ttl)

    @abc.abstractmethod
    def statistics(self, key: str) -> KeyStatistics:
        """Who holds *key* now and how many wait (local knowledge for remote backends)."""

    def _discard_sync(self, key: str, owner: bytes, grant: Grant) -> None:
        """Give back a grant nobody will use (its waiter was cancelled); never raises LeaseLost."""
        from ..errors import LeaseLost

        with contextlib.suppress(LeaseLost):
            self.release_sync(key, owner, grant[0])

    async def _discard(self, key: str, owner: bytes, grant: Grant) -> None:
        """Async twin of :meth:`_discard_sync`."""
        self._discard_sync(key, owner, grant)

    # Leases with a TTL are shown to the backend so it can renew them (Redis auto-renew).
    def _track(self, lease: Lease) -> None:
        """Start looking after *lease* (auto-renew); the default backend does nothing."""

    def _untrack(self, lease: Lease) -> None:
        """Stop looking after *lease*."""

    def close_sync(self) -> None:
        """Free connections and background work; the default backend has none."""

    async def close(self) -> None:
        """Async twin of :meth:`close_sync`."""
        self.close_sync()

    # ------------------------------------------------------- the blocking acquire, written once

    async def acquire(
        self, key: str, owner: bytes, *, timeout: float | None, ttl: float | None
    ) -> Grant:
        """Wait for *key* (``timeout=None`` forever, ``0`` one try); raise LockTimeout.

        A caller cancelled while waiting leaves nothing behind: a grant that raced the cancel is
        passed on to the next waiter before the cancellation propagates.
        """
        inline = self.nonblocking_step
        if timeout == 0 or not inline:  # the caller of an inline step has just tried it
            grant = (
                self._try_acquire(key, owner, ttl, None)
                if inline
                else await self._try_acquire_async(key, owner, ttl, None)
            )
            if grant is not None:
                return grant
            if timeout == 0:
                raise _timeout(key, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = LoopWaiter(owner, ttl)
        try:
            while True:
                grant = waiter.grant
                if grant is None:
                    waiter.prepare()
                    grant = waiter.grant or (
                        self._try_acquire(key, owner, ttl, waiter)
                        if inline
                        else await self._try_acquire_async(key, owner, ttl, waiter)
                    )
                if grant is not None:
                    if grant is not waiter.grant:  # granted by the step: unregister the waiter
                        self._withdraw(key, waiter)
                    return grant
                if deadline is None and waiter.retry_at == math.inf:
                    await waiter._future  # woken by a hand-off or release: no timer needed
                    continue
                delay = _delay(deadline, waiter.retry_at)
                if delay == 0.0:  # deadline passed: a grant handed over meanwhile still counts
                    grant = self._withdraw(key, waiter)
                    if grant is not None:
                        return grant
                    raise _timeout(key, timeout)
                await waiter.wait(delay)
        except BaseException:
            grant = self._withdraw(key, waiter)
            if grant is not None:
                # a waiter cancelled after the hand-off passes the lock on (as anyio's Lock)
                if inline:
                    self._discard_sync(key, owner, grant)
                else:
                    await asyncio.shield(self._discard(key, owner, grant))
            raise

    def acquire_sync(
        self, key: str, owner: bytes, *, timeout: float | None, ttl: float | None
    ) -> Grant:
        """Blocking twin of :meth:`acquire`; an interrupt while waiting leaves nothing behind."""
        if timeout == 0 or not self.nonblocking_step:
            grant = self._try_acquire(key, owner, ttl, None)
            if grant is not None:
                return grant
            if timeout == 0:
                raise _timeout(key, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = ThreadWaiter(owner, ttl)
        try:
            while True:
                grant = waiter.grant
                if grant is None:
                    waiter.prepare()
                    grant = waiter.grant or self._try_acquire(key, owner, ttl, waiter)
                if grant is not None:
                    if grant is not waiter.grant:
                        self._withdraw(key, waiter)
                    return grant
                delay = _delay(deadline, waiter.retry_at)
                if delay == 0.0:
                    grant = self._withdraw(key, waiter)
                    if grant is not None:
                        return grant
                    raise _timeout(key, timeout)
                waiter.wait(delay)
        except BaseException:
            grant = self._withdraw(key, waiter)
            if grant is not None:
                self._discard_sync(key, owner, grant)
            raise


def _delay(deadline: float | None, retry_at: float) -> float | None:
    """Seconds to wait before the next step: until the deadline or the retry time, if any."""
    until = retry_at if deadline is None else min(deadline, retry_at)
    if until == math.inf:
        return None
    now = time.monotonic()
    if deadline is not None and now >= deadline:
        return 0.0
    return max(until - now, 0.0) or 1e-6


def _timeout(key: str, timeout: float | None) -> LockTimeout:
    return LockTimeout(
        f"lock {key!r} was not granted within {timeout}s: another holder still has it; "
        "raise the timeout, or use timeout=None to wait until it is free",
        key=key,
    )
