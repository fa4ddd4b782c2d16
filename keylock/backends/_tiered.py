"""The shared core of backends whose arbiter is slower than a dict (a lock file, a server).

Such a backend is two tiers. In front, one in-process FIFO queue (a :class:`MemoryBackend`):
tasks, threads and event loops of this process queue there, so the arbiter sees one caller per
key per process. Behind it, the *arbiter* decides between processes or hosts. This module
writes, once, everything but the arbiter: the map of keys held at the arbiter, the mapping
between the arbiter's token and the local turn, discard-on-failure, and the two drivers of an
acquire. An arbiter supplies a sans-IO :class:`Flow` (what to send next, how long to wait,
what a reply means; the clock passed in) and how to make one trip, release and extend.
"""

from __future__ import annotations

import abc
import contextlib
import time
from typing import TYPE_CHECKING, NamedTuple

from ..errors import BackendUnavailable, LeaseLost
from ._tier import Held, PermitTier, Tier
from ._waiters import LoopWaiter, ThreadWaiter, Waiter
from .base import Backend, Deadline, Grant, KeyStatistics, described, shape_of

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["Flow", "Held", "PermitTier", "Step", "Tier", "TieredBackend"]


class Step(NamedTuple):
    """What an acquire does next: send *trip* to the arbiter, or wait up to *wait* seconds
    (None: until woken)."""

    trip: object | None
    wait: float | None


class Flow(abc.ABC):
    """The decisions of one acquire at the arbiter, with no I/O: a driver asks :meth:`next`,
    makes the trip or the wait it names, and reports replies; the clock is passed in."""

    grant: Grant | None = None  # set once the arbiter granted the key

    def __init__(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        deadline: Deadline,
        waiter: Waiter,
        local: Grant,
    ) -> None:
        self.key = key
        self.owner = owner
        self.ttl = ttl
        self.deadline = deadline
        self.waiter = waiter  # woken when the arbiter hands the key over (or never)
        self.local = local  # this caller's in-process turn

    @abc.abstractmethod
    def next(self, now: float) -> Step | None:
        """The next step, or None once :attr:`grant` is set; LockTimeout past the deadline."""

    @abc.abstractmethod
    def on_reply(self, reply: object, now: float) -> None:
        """Take the arbiter's reply to the last trip."""

    def on_error(self, error: Exception, now: float) -> Exception:
        """The error to raise for a trip that failed (the deadline may make it LockTimeout)."""
        return error

    def leaving(self) -> object | None:
        """The trip that takes this caller out of the arbiter's line when it gives up."""
        return None

    def close(self) -> None:
        """The acquire ended (granted or not): drop what was set up for it."""


class TieredBackend(Backend):
    """A backend made of the in-process tier and an arbiter; subclasses write the arbiter."""

    _tier: Tier
    _shut = False  # set by close: every call raises from then on (see _closed_error)
    _leases_outlive_close = False  # True: release and extend of a held lease still work

    def _raise_if_shut(self, key: str, error: BaseException) -> None:
        """A call that failed (an Exception) because the backend closed under it says so, as a
        call made after close does: one message, whichever layer noticed first."""
        if self._shut and isinstance(error, Exception):
            raise self._closed_error(key) from error

    def _closed_error(self, key: str) -> BackendUnavailable:
        """A backend used after its close: it grants nothing more (its connections, files or
        renewal are gone), said as such, not as a store that is down."""
        return BackendUnavailable(
            f"{self!r} is closed: it grants nothing after close() "
            f"({described(key, shape_of(self))}); make a new "
            "backend, and close it only when its locks are no longer used",
            key=key,
        )

    # ------------------------------------------------------------------- the arbiter's part

    @abc.abstractmethod
    def _flow(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        deadline: Deadline,
        waiter: Waiter,
        local: Grant,
    ) -> Flow:
        """A new acquire's flow (see :class:`Flow`)."""

    def _try_now(self, key: str, owner: bytes, ttl: float | None, local: Grant) -> Grant | None:
        """One non-blocking try at the arbiter (only for arbiters that may run inline)."""
        raise NotImplementedError

    @abc.abstractmethod
    def _trip_sync(self, flow: Flow, trip: object) -> object:
        """Make *trip* (blocking); errors as keylock errors."""

    async def _trip(self, flow: Flow, trip: object) -> object:
        """Make *trip* from an event loop; by default the blocking call (local I/O)."""
        return self._trip_sync(flow, trip)

    @abc.abstractmethod
    def _end_sync(self, key: str, held: Held) -> bool:
        """Give the key back at the arbiter; False if it was no longer ours."""

    async def _end(self, key: str, held: Held) -> bool:
        return self._end_sync(key, held)

    def _left_sync(self, flow: Flow) -> None:
        """The caller of *flow* gave up: take it out of the arbiter's line (never raises)."""
        trip = flow.leaving()
        if trip is not None:
            with contextlib.suppress(Exception):
                self._trip_sync(flow, trip)

    async def _left(self, flow: Flow) -> None:
        self._left_sync(flow)

    def _adopt(self, flow: Flow) -> Grant:
        """Record the lease *flow* was granted at the arbiter; return the caller's grant."""
        grant = flow.grant
        assert grant is not None
        tier = self._tier
        with tier.mutex:
            tier.held[flow.key] = Held(grant[0], flow.owner, flow.local[0])
        return grant

    # ---------------------------------------------------------------- the drivers, written once

    def _try_acquire(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        waiter: Waiter | None,
        holder: FrameType | None = None,
    ) -> Grant | None:
        """The uncontended step of an inline arbiter: this process's turn, then one try."""
        if not self.nonblocking_step:
            raise TypeError(f"{self!r} has no non-blocking step: use acquire(timeout=0)")
        if self._shut:
            raise self._closed_error(key)
        local_tier = self._tier.local
        local = local_tier._try_acquire(key, owner, ttl, None, holder)
        if local is None:
            return None
        try:
            grant = self._try_now(key, owner, ttl, local)
        except BaseException:
            local_tier._discard_sync(key, owner, local)
            raise
        if grant is None:
            local_tier._discard_sync(key, owner, local)
        return grant

    def _withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        return None  # waiters queue in the in-process tier, which withdraws them itself

    async def acquire(
        self,
        key: str,
        owner: bytes,
        *,
        timeout: float | None,
        ttl: float | None,
        holder: FrameType | None = None,
    ) -> Grant:
        """Wait for *key*: first this process's turn (FIFO), then the arbiter. A caller that
        gives up (timeout, cancel, error) leaves both lines and holds nothing."""
        if self._shut:
            raise self._closed_error(key)
        local_ttl = self._local_ttl(ttl)
        deadline = Deadline(key, timeout, time.monotonic(), self.shape)
        tier = self._tier
        local = tier.local._try_acquire(key, owner, local_ttl, None, holder) or (
            await tier.local.acquire(key, owner, timeout=timeout, ttl=local_ttl, holder=holder)
        )
        waiter = LoopWaiter(owner, ttl)
        flow: Flow | None = None
        try:
            flow = self._flow(key, owner, ttl, deadline, waiter, local)  # (may refuse the key)
            while (step := flow.next(time.monotonic())) is not None:
                if step.trip is None:
                    await waiter.wait(step.wait)
                    continue
                if self._shut:  # (the close woke us: it took us out of the line)
                    raise self._closed_error(key)
                waiter.prepare()  # before the trip re-reads the state: no wake-up is lost
                try:
                    reply = await self._trip(flow, step.trip)
                except Exception as exc:
                    self._raise_if_shut(key, exc)
                    _raise(flow.on_error(exc, time.monotonic()), exc)
                flow.on_reply(reply, time.monotonic())
            return self._adopt(flow)
        except BaseException:
            try:
                if flow is not None:
                    await self._left(flow)
            finally:
                tier.local._discard_sync(key, owner, local)  # pass the in-process turn on
            raise
        finally:
            if flow is not None:
                flow.close()

    def acquire_sync(
        self,
        key: str,
        owner: bytes,
        *,
        timeout: float | None,
        ttl: float | None,
        holder: FrameType | None = None,
    ) -> Grant:
        """Blocking twin of :meth:`acquire`."""
        if self._shut:
            raise self._closed_error(key)
        local_ttl = self._local_ttl(ttl)
        deadline = Deadline(key, timeout, time.monotonic(), self.shape)
        tier = self._tier
        local = tier.local._try_acquire(key, owner, local_ttl, None, holder) or (
            tier.local.acquire_sync(key, owner, timeout=timeout, ttl=local_ttl, holder=holder)
        )
        waiter = ThreadWaiter(owner, ttl)
        flow: Flow | None = None
        try:
            flow = self._flow(key, owner, ttl, deadline, waiter, local)  # (may refuse the key)
            while (step := flow.next(time.monotonic())) is not None:
                if step.trip is None:
                    waiter.wait(step.wait)
                    continue
                if self._shut:
                    raise self._closed_error(key)
                waiter.prepare()
                try:
                    reply = self._trip_sync(flow, step.trip)
                except Exception as exc:
                    self._raise_if_shut(key, exc)
                    _raise(flow.on_error(exc, time.monotonic()), exc)
                flow.on_reply(reply, time.monotonic())
            return self._adopt(flow)
        except BaseException:
            try:
                if flow is not None:
                    self._left_sync(flow)
            finally:
                tier.local._discard_sync(key, owner, local)
            raise
        finally:
            if flow is not None:
                flow.close()

    def _local_ttl(self, ttl: float | None) -> float | None:
        """The TTL of the in-process turn: the lease's own (the tier hands an expired lease's
        key to the next caller here, as the arbiter would to another process)."""
        return ttl

    # ---------------------------------------------------------------- release and extend

    def _take_held(self, key: str, owner: bytes, token: int, *, pop: bool) -> Held:
        """The lease a release (*pop*) or an extend is about: LeaseLost if it is not ours.
        On a closed backend, the closed error: nothing reaches the arbiter (nothing opens a
        connection after close; the lease there lapses with its TTL), but a release passes
        the in-process turn on, so a caller here waiting for it hears that too."""
        held = self._find_held(key, owner, token, pop=pop)
        if self._shut and not self._leases_outlive_close:
            if pop and held is not None:
                self._release_local(key, held)
            raise self._closed_error(key)
        if held is None:
            raise self._lost(key, token)
        return held

    def _find_held(self, key: str, owner: bytes, token: int, *, pop: bool) -> Held | None:
        """*owner*'s lease *token* on *key* (taken out of the map if *pop*), or None."""
        tier = self._tier
        with tier.mutex:
            held = tier.held.get(key)
            if held is None or held.token != token or held.owner != owner:
                return None
            if pop:
                del tier.held[key]
            return held

    def _lost(self, key: str, token: int) -> LeaseLost:
        return LeaseLost(
            f"lease {token} on {key!r} was lost (its TTL ran out, it was taken over, or it "
            "was already released): the critical section was not protected; reconcile before "
            "acting",
            key=key,
        )

    def _release_local(self, key: str, held: Held) -> bool:
        """End the in-process turn; False if it had lapsed (its TTL ran out here)."""
        try:
            self._tier.local.release_sync(key, held.owner, held.local_token)
        except LeaseLost:
            return False
        return True

    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        held = self._take_held(key, owner, token, pop=True)
        try:
            ours = self._end_sync(key, held)
        except BaseException as exc:
            self._release_local(key, held)  # the next caller here goes on, whatever happened
            self._raise_if_shut(key, exc)
            raise
        if not (self._release_local(key, held) and ours):
            raise self._lost(key, token)

    async def release(self, key: str, owner: bytes, token: int) -> None:
        held = self._take_held(key, owner, token, pop=True)
        try:
            ours = await self._end(key, held)
        except BaseException as exc:
            self._release_local(key, held)
            self._raise_if_shut(key, exc)
            raise
        if not (self._release_local(key, held) and ours):
            raise self._lost(key, token)

    def _extend_local(self, key: str, held: Held, ttl: float) -> Grant:
        """Move the in-process turn's deadline (raises LeaseLost if it had lapsed); the
        lease's dates are the turn's, its token the arbiter's."""
        local = self._tier.local.extend_sync(key, held.owner, held.local_token, ttl)
        return Grant(held.token, local[1], local[2])

    def statistics(self, key: str) -> KeyStatistics:
        if self._shut:
            raise self._closed_error(key)
        tier = self._tier
        local = tier.local.statistics(key)
        with tier.mutex:
            held = tier.held.get(key)
        if held is not None:
            return KeyStatistics(key, True, held.token, held.owner, local.waiting)
        return self._arbiter_statistics(key, local)

    @abc.abstractmethod
    def _arbiter_statistics(self, key: str, local: KeyStatistics) -> KeyStatistics:
        """Statistics of a key this process does not hold at the arbiter."""


def _raise(error: Exception, cause: Exception) -> None:
    """Raise *error*: *cause* itself as it is, or another error chained to it."""
    if error is cause:
        raise cause
    raise error from cause
