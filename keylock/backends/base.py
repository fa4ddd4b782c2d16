"""The backend protocol: a non-blocking step per backend, driven by one blocking acquire.

A backend writes its *step* once (``_try_acquire``: grant now, or register a waiter and
return). The async and sync drivers here differ only in how they wait: a
:class:`~keylock.backends._waiters.LoopWaiter` (a future on the caller's event loop, woken
thread-safely) or a :class:`~keylock.backends._waiters.ThreadWaiter` (a latch released by the
waker). Backends whose arbiter is slower than a dict (a lock file, a server) put an in-process
queue in front of it: see :mod:`keylock.backends._tiered`.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple, TypeVar, cast

from ..errors import LeaseLost, LockTimeout
from ._waiters import LoopWaiter, ThreadWaiter, Waiter

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

    from ..lease import Lease

__all__ = [
    "RW_LIMIT",
    "Backend",
    "Deadline",
    "Grant",
    "KeyStatistics",
    "LoopWaiter",
    "Permits",
    "ThreadWaiter",
    "Waiter",
    "described",
    "shape_of",
]


class Grant(NamedTuple):
    """One granted lease as the backend sees it: its fencing token and when it lapses.

    Read by index (``grant[0]`` to ``grant[3]``) on the hot path, so a backend may
    return any sequence laid out the same way (the memory backend returns its entry record).
    """

    token: int  # strictly increasing per key, never reused
    expires_at: float | None  # time.time() after which the lease is void (for display)
    deadline: float | None = None  # time.monotonic() after which it is void: what counts
    took_over: bool = False  # it followed a lease that expired (not one that was released)


@dataclass(frozen=True, slots=True)
class KeyStatistics:
    """A snapshot of one key: who holds it and how many wait (for debugging and tests)."""

    key: str
    held: bool
    token: int | None
    owner: bytes | None
    waiting: int
    holders: int = 0  # live leases on the key (a permit key may have several; 0 if unknown)


class Permits(NamedTuple):
    """The shape of a permit key: the weight of live leases on it never exceeds ``limit``."""

    limit: int  # how much weight may be held at once on a key
    weight: int  # what one lease takes: 1, or ``limit`` (an RW writer)


#: An RW lock is a key of capacity RW_LIMIT: a reader takes 1, a writer all of it.
RW_LIMIT = 1 << 30


B = TypeVar("B", bound="Backend")

#: backend class -> the maker of its permit views. A view subclasses its backend, so the
#: backend cannot import it: it names the module (``permit_module``), which registers here.
_PERMIT_VIEWS: dict[type, Callable[[Backend, int, int], Backend]] = {}


def register_permits(cls: type[B], make: Callable[[B, int, int], Backend]) -> None:
    """Make *make* (``(backend, limit, weight) -> view``) answer ``permits()`` of *cls*."""
    _PERMIT_VIEWS[cls] = make  # type: ignore[assignment]  # (called only on a cls instance)


class Deadline:
    """When a waiting caller gives up: the one place that turns a timeout into LockTimeout.

    *shape* is the permit shape of a semaphore or RW lock acquire (None for a lock): read only
    to word the error, so it costs the acquire nothing but its storage."""

    __slots__ = ("at", "key", "shape", "timeout")

    def __init__(
        self, key: str, timeout: float | None, now: float, shape: Permits | None = None
    ) -> None:
        self.key = key
        self.timeout = timeout
        self.at = math.inf if timeout is None else now + timeout
        self.shape = shape

    def until(self, retry_at: float, now: float) -> float | None:
        """Seconds to wait before the next try (None: until woken); LockTimeout once passed."""
        if now >= self.at:
            raise self.expired()
        until = min(self.at, retry_at)
        if until == math.inf:
            return None
        return max(until - now, 1e-6)

    def passed(self, now: float) -> bool:
        return now >= self.at

    def expired(self) -> LockTimeout:
        what, why, it = _blocked(self.key, self.shape, still=self.timeout != 0)
        if self.timeout == 0:  # a try: telling its caller to wait longer would contradict it
            return LockTimeout(
                f"{what} was not granted: {why}, and timeout=0 tries once without waiting; "
                f"skip it or retry later, or pass timeout=SECONDS to wait for {it}",
                key=self.key,
            )
        return LockTimeout(
            f"{what} was not granted within {self.timeout}s: {why}, and nothing was granted; "
            f"raise the timeout, or use timeout=None to wait until {it} is free",
            key=self.key,
        )


def described(key: str, shape: Permits | None) -> str:
    """*key* named as what it is: a lock, a semaphore or an RW lock (for messages)."""
    if shape is None:
        return f"lock {key!r}"
    return f"RW lock {key!r}" if shape[0] == RW_LIMIT else f"semaphore {key!r}"


def shape_of(backend: object) -> Permits | None:
    """The permit shape of a permit view (None for a backend's locks): read only for a
    message, once a call has failed."""
    return cast("Permits | None", getattr(backend, "shape", None))


def _blocked(key: str, shape: Permits | None, *, still: bool) -> tuple[str, str, str]:
    """What was not granted, what holds it (a lock's holder, a semaphore's permits, the side
    of an RW lock that excludes the one asked for), and what to wait for ("it" or "one")."""
    more = " still" if still else ""
    if shape is None:
        return f"lock {key!r}", f"another holder{more} has it", "it"
    limit, weight = shape
    if limit == RW_LIMIT and weight == 1:  # (a waiting writer goes before later readers)
        return "the read lock", f"a writer{more} holds RW lock {key!r} or waits for it", "it"
    if limit == RW_LIMIT:
        holds = f"readers or another writer{more} hold RW lock {key!r} or are ahead in line"
        return "the write lock", holds, "it"
    if limit == 1:
        return "a permit", f"the one permit of semaphore {key!r} is{more} held", "it"
    return "a permit", f"all {limit} permits of semaphore {key!r} are{more} held", "one"


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
    #: The module that writes this backend's permit views (imported on the first permits()).
    permit_module: ClassVar[str | None] = None
    #: A permit view's shape (None: per-key locks), for the wording of its LockTimeout.
    shape: Permits | None = None

    # ----------------------------------------------------------------- the step, per backend

    @abc.abstractmethod
    def _try_acquire(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        waiter: Waiter | None,
        holder: FrameType | None = None,
    ) -> Grant | None:
        """Grant *key* now, or register *waiter* (idempotently) and return None. Never blocks.

        When it registers the waiter, the backend either hands it a grant later (``waiter.grant``
        then ``wake()``), or wakes it to run the step again; ``waiter.retry_at`` says when to run
        the step again if no wake-up comes (a holder's TTL running out, a safety-net poll).
        *holder* (or ``waiter.holder``) is the frame of the block that will hold the key: a
        waiter whose own stack runs the block holding the key gets RuntimeError, not a wait
        (a try without a waiter just returns None).
        """

    @abc.abstractmethod
    def _withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        """Remove *waiter* from *key*'s queue; return a grant already handed to it, if any."""

    @abc.abstractmethod
    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        """Release the lease *token* on *key*; raises LeaseLost if it was no longer live."""

    async def release(self, key: str, owner: bytes, token: int) -> None:
        """Release the lease *token* on *key*; raises LeaseLost if it was no longer live."""
        self.release_sync(key, owner, token)

    @abc.abstractmethod
    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        """Make the live lease *token* expire *ttl* seconds from now; return its new dates
        (``expires_at``, ``deadline``); LeaseLost if it is no longer live."""

    async def extend(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        """Async twin of :meth:`extend_sync`."""
        return self.extend_sync(key, owner, token, ttl)

    @abc.abstractmethod
    def statistics(self, key: str) -> KeyStatistics:
        """Who holds *key* now and how many wait (local knowledge for remote backends)."""

    def _discard_sync(self, key: str, owner: bytes, grant: Grant) -> None:
        """Give back a grant nobody will use (its waiter was cancelled); never raises LeaseLost."""
        with contextlib.suppress(LeaseLost):
            self.release_sync(key, owner, grant[0])

    # Leases with a TTL are shown to the backend so it can renew them (Redis auto-renew).
    def _track(self, lease: Lease) -> None:
        """Start looking after *lease* (auto-renew); the default backend does nothing."""

    def _untrack(self, lease: Lease) -> None:
        """Stop looking after *lease*."""

    def permits(self, limit: int, weight: int = 1) -> Backend:
        """A view of this backend whose leases are permits of shape ``(limit, weight)``.

        The view shares this backend's state, connections and lifetime (its ``close`` does
        nothing); the permit keyspace is separate from the lock keyspace. Views are cached per
        shape. A backend without semaphores raises TypeError.
        """
        for cls in type(self).__mro__:
            make = _PERMIT_VIEWS.get(cls)
            if make is None and cls.__dict__.get("permit_module"):
                importlib.import_module(cls.__dict__["permit_module"])  # (it registers)
                make = _PERMIT_VIEWS.get(cls)
            if make is not None:
                return make(self, limit, weight)
        raise TypeError(
            f"{type(self).__name__} has no semaphores or RW locks (permits({limit}, {weight})): "
            "use MemoryBackend, FileBackend, RedisBackend or PostgresBackend"
        )

    def close_sync(self) -> None:
        """Free connections and background work; the default backend has none."""

    async def close(self) -> None:
        """Async twin of :meth:`close_sync`."""
        self.close_sync()

    # ------------------------------------------------------- the blocking acquire, written once

    async def acquire(
        self,
        key: str,
        owner: bytes,
        *,
        timeout: float | None,
        ttl: float | None,
        holder: FrameType | None = None,
    ) -> Grant:
        """Wait for *key* (``timeout=None`` forever, ``0`` one try); raise LockTimeout.

        A caller cancelled while waiting leaves nothing behind: a grant that raced the cancel is
        passed on to the next waiter before the cancellation propagates. The caller has just
        tried the step (the uncontended path), so this starts by queueing. *holder*: the frame
        of the block that will hold the key (re-entry is refused, see ``_try_acquire``).
        """
        deadline = Deadline(key, timeout, time.monotonic(), self.shape)
        if timeout == 0:
            return self._once(key, owner, ttl, deadline, holder)
        waiter = LoopWaiter(owner, ttl, holder)
        try:
            while True:
                grant, delay = self._round(key, owner, ttl, waiter, deadline)
                if grant is not None:
                    return grant
                await waiter.wait(delay)
        except BaseException:
            self._give_up(key, owner, waiter)
            raise

    def acquire_sync(
        self,
        key: str,
        owner: bytes,
        *,
        timeout: float | None,
        ttl: float | None,
        holder: FrameType | None = None,
    ) -> Grant:
        """Blocking twin of :meth:`acquire`; an interrupt while waiting leaves nothing behind."""
        deadline = Deadline(key, timeout, time.monotonic(), self.shape)
        if timeout == 0:
            return self._once(key, owner, ttl, deadline, holder)
        waiter = ThreadWaiter(owner, ttl, holder)
        try:
            while True:
                grant, delay = self._round(key, owner, ttl, waiter, deadline)
                if grant is not None:
                    return grant
                waiter.wait(delay)
        except BaseException:
            self._give_up(key, owner, waiter)
            raise

    # The twins above differ only in how they wait; the decisions are these three.

    def _once(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        deadline: Deadline,
        holder: FrameType | None,
    ) -> Grant:
        grant = self._try_acquire(key, owner, ttl, None, holder)
        if grant is None:
            raise deadline.expired()
        return grant

    def _round(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        waiter: LoopWaiter | ThreadWaiter,
        deadline: Deadline,
    ) -> tuple[Grant | None, float | None]:
        """One look: (the grant, None), or (None, how long to wait; None until woken).
        LockTimeout once the deadline passed, unless a grant was handed over meanwhile."""
        grant = self._live(key, owner, waiter, waiter.grant)
        if grant is None:
            waiter.prepare()  # before the step, so a wake-up after it is not lost
            grant = self._live(key, owner, waiter, waiter.grant) or self._try_acquire(
                key, owner, ttl, waiter
            )
        if grant is not None:
            if grant is not waiter.grant:  # granted by the step: unregister the waiter
                self._withdraw(key, waiter)
            return grant, None
        try:
            return None, deadline.until(waiter.retry_at, time.monotonic())
        except LockTimeout:
            # a grant handed over meanwhile still counts, if it has not lapsed yet
            grant = self._live(key, owner, waiter, self._withdraw(key, waiter))
            if grant is None:
                raise
            return grant, None

    def _live(self, key: str, owner: bytes, waiter: Waiter, grant: Grant | None) -> Grant | None:
        """*grant* if it is still live; None, having passed the key on, if it lapsed before
        its waiter could take it (its thread or event loop was frozen past the lease's TTL):
        a waiter never returns a lease that is already lost."""
        if grant is None or grant[2] is None:
            return grant
        clock = getattr(self, "clock", None)  # the clock the backend dates deadlines with
        if (clock.monotonic() if clock is not None else time.monotonic()) < grant[2]:
            return grant
        waiter.grant = None
        self._discard_sync(key, owner, grant)
        return None

    def _give_up(self, key: str, owner: bytes, waiter: Waiter) -> None:
        """The waiter leaves (timeout, cancel, error): a grant that raced it is passed on to the
        next waiter (as anyio's Lock does)."""
        grant = self._withdraw(key, waiter)
        if grant is not None:
            self._discard_sync(key, owner, grant)
