"""In-process leases: one dict under one ``threading.Lock``, with a FIFO queue per held key."""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, TypeAlias

from .._clock import SYSTEM_CLOCK, Clock
from .._validate import check_backend_ttl
from ..errors import LeaseLost
from ._waiters import on_this_stack, reentry_error
from .base import Backend, Grant, KeyStatistics, Waiter

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

__all__ = ["MemoryBackend"]

# A held key's record, also returned as its holder's grant (index 0 to 3 match Grant), so
# the uncontended path allocates one small list and no object with a Python __init__. Each
# grant gets a new record, so a returned grant's token never changes under its holder.
# [token, expires_at, deadline, took_over, owner, waiters, holder]: loosely typed, on purpose
# (hot path)
_Entry: TypeAlias = list[Any]
#: MemoryBackend.free_claim: (the entries' setdefault, the token counter's next)
FreeClaim: TypeAlias = "tuple[Callable[[str, _Entry], _Entry], Callable[[], int]]"
#: MemoryBackend.free_release: (the mutex's acquire, its release, the entries, _hand_off)
FreeRelease: TypeAlias = (
    "tuple[Callable[[], object], Callable[[], None], dict[str, _Entry], Callable[..., bool]]"
)
_TOKEN = 0  # the live lease's token: the proof of ownership in-process (0 until minted)
_EXPIRES_AT = 1  # clock.time() when it lapses, or None (display only)
_DEADLINE = 2  # clock.monotonic() when it lapses, or None: what expiry is judged by
_TOOK_OVER = 3  # True when this lease followed one that expired rather than was released
_OWNER = 4  # owner id as passed by the caller (b"" when the caller needs none)
_WAITERS = 5  # OrderedDict[Waiter, None] in FIFO order, or None; never holds a granted waiter
_HOLDER = 6  # the frame of the block holding the key, or None (to refuse re-entry)
# The owner of a lapsed record: a lease that ended without a live release, kept until the key
# is next used so its next holder learns it took the key over.
_LAPSED = object()
MAX_LAPSED = 10_000  # lapsed records kept at most (beyond, all are forgotten at once)


class MemoryBackend(Backend):
    """Per-key leases within one process, shared by asyncio tasks, threads and event loops.

    Hand-off is FIFO (a releasing holder gives the key straight to the oldest waiter, so
    nobody barges); a waiter whose event loop has closed is skipped. Per-key state is freed as
    soon as a key is neither held nor awaited (a lease that lapsed leaves a small record until
    its key is next used, which tells the next holder it took the key over; at most
    ``MAX_LAPSED`` of them). Tokens count up by one per grant from the wall clock in µs at
    construction, so they increase per key and do not go back across a restart of the process
    (as long as it granted fewer than one lease per µs over its life).
    With a TTL, an expired lease is taken over by the next caller or waiter, and its holder's
    release raises :class:`~keylock.LeaseLost`. A forked child starts with nothing held.
    """

    needs_owner = False  # the token proves ownership in-process
    #: How KeyedLock's uncontended entry claims a free key without a call into the backend
    #: (set with the per-instance fast paths, else None): ``(setdefault, mint)``. It inserts a
    #: fresh untimed record ``[0, None, None, False, b"", None, holder]`` with ``setdefault`` and,
    #: if that record is the one now there, mints its token into index 0 (after the claim: see
    #: ``_fast_paths``), exactly as ``try_acquire`` does first; else it takes the full step.
    free_claim: FreeClaim | None = None
    #: How a sync block's exit releases without a call into the backend (set with free_claim):
    #: under the mutex, a record that is the lease's (its very token object) and untimed is
    #: handed on (``_hand_off``) or deleted, as ``release_sync`` does; else release_sync runs.
    free_release: FreeRelease | None = None

    def __init__(self, *, ttl: float | None = None, clock: Clock | None = None) -> None:
        self.default_ttl = check_backend_ttl(ttl, "MemoryBackend")
        self.clock = clock if clock is not None else SYSTEM_CLOCK
        # (a forked child resets the mutex and forgets the entries: the parent's threads,
        # which held its keys and may have held the mutex, do not exist there)
        self._mutex = threading.Lock()  # guards _entries and every entry
        self._entries: dict[str, _Entry] = {}  # guarded by _mutex: held keys, lapsed records
        self._lapsed = 0  # guarded by _mutex: how many entries are lapsed records
        # Tokens count up from the wall clock in µs at construction: a backend made after a
        # restart starts past every token of the last process (unless that one granted more
        # than a lease per µs on average over its whole life). next() on a count is atomic.
        self._tokens = itertools.count(time.time_ns() // 1000)
        # The uncontended acquire and release, as closures over their state: loads of closure
        # cells beat attribute loads, and this pair is most of the cost of an uncontended lock.
        # (Not when a subclass overrides either: its override must stay in charge.)
        cls = type(self)
        if (
            cls._try_acquire is MemoryBackend._try_acquire
            and cls.release_sync is MemoryBackend.release_sync
        ):
            self._try_acquire, self.release_sync = self._fast_paths()  # type: ignore[method-assign,assignment]
            self.free_claim = (self._entries.setdefault, self._tokens.__next__)
            mutex = self._mutex
            self.free_release = (mutex.acquire, mutex.release, self._entries, self._hand_off)
        _BACKENDS.add(self)

    def __repr__(self) -> str:
        return f"MemoryBackend(held={len(self)})"

    def __len__(self) -> int:
        """How many keys are held now (for leak checks)."""
        return len(self._entries) - self._lapsed

    # ------------------------------------------------------------------------------- step

    def _fast_paths(
        self,
    ) -> tuple[
        Callable[[str, bytes, float | None, Waiter | None, FrameType | None], Grant | None],
        Callable[[str, bytes, int], None],
    ]:
        # explicit acquire/release: about 0.13 us cheaper per call than ``with`` on CPython 3.11
        lock = self._mutex.acquire
        unlock = self._mutex.release
        entries = self._entries
        get = entries.get
        claim = entries.setdefault
        tokens = self._tokens
        slow_acquire = self._try_acquire_contended
        slow_release = self._release_contended
        hand_off = self._hand_off

        # (literal indices below: constants beat global lookups on this path)
        def try_acquire(
            key: str,
            owner: bytes,
            ttl: float | None,
            waiter: Waiter | None,
            holder: FrameType | None = None,
        ) -> Grant | None:
            if ttl is None:
                # A free key is claimed without the mutex, by one atomic dict operation
                # (setdefault on a str key runs no Python code): see _claim for why that is
                # safe. The token is minted after the claim, so a claim that was overtaken
                # between its mint and its insert can never hold an older token than the
                # lease before it.
                entry = [0, None, None, False, owner, None, holder]
                if claim(key, entry) is entry:
                    entry[0] = next(tokens)
                    return entry  # type: ignore[return-value]  # laid out as a Grant
            lock()
            try:
                return slow_acquire(key, owner, ttl, waiter, get(key), holder)
            finally:
                unlock()

        def release(key: str, owner: bytes, token: int) -> None:
            lock()
            try:
                entry = get(key)
                if entry is None or entry[0] != token or entry[4] != owner:
                    raise _lost(key, token)
                if entry[2] is None:  # no TTL: cannot have expired
                    if entry[5]:
                        hand_off(key, entry)
                    else:
                        del entries[key]
                    return
                expired = slow_release(key, entry)
            finally:
                unlock()
            if expired:
                raise _lost(key, token)

        return try_acquire, release

    def _try_acquire(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        waiter: Waiter | None,
        holder: FrameType | None = None,
    ) -> Grant | None:
        with self._mutex:
            entry = self._entries.get(key)
            return self._try_acquire_contended(key, owner, ttl, waiter, entry, holder)

    def _try_acquire_contended(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        waiter: Waiter | None,
        entry: _Entry | None,
        holder: FrameType | None,
    ) -> Grant | None:
        """The step, beyond the uncontended case. Caller holds _mutex."""
        if waiter is not None:
            if waiter.grant is not None:
                # handed the key between the caller's last look and this step: never queue a
                # granted waiter again (its next hand-off would go to nobody)
                return waiter.grant
            holder = waiter.holder
        if entry is None:
            record = self._record(owner, ttl, None, False, holder)
            entry = self._claim(key, record)
            if entry is record:
                return record  # type: ignore[return-value]  # laid out as a Grant
        deadline = entry[_DEADLINE]
        if deadline is not None and self.clock.monotonic() >= deadline:
            # the holder's lease ran out: the key goes to the oldest waiter, else to us (in
            # place: a key that is never free for an instant lets no claim slip in that would
            # not learn it took the key over)
            if not self._hand_off(key, entry, took_over=True, keep=True):
                record = self._entries[key] = self._record(owner, ttl, None, True, holder)
                return record  # type: ignore[return-value]
            if waiter is not None and waiter.grant is not None:
                return waiter.grant
            entry = self._entries[key]
        if waiter is None:
            return None  # (a try never waits, so it may probe a key its own block holds)
        held_by = entry[_HOLDER]
        if held_by is not None and on_this_stack(held_by):
            raise reentry_error(key)  # (waiting for one's own block would never end)
        waiters = entry[_WAITERS]
        if waiters is None:
            waiters = entry[_WAITERS] = OrderedDict()
        waiters[waiter] = None  # no-op when already queued: keeps its place
        deadline = entry[_DEADLINE]
        waiter.retry_at = math.inf if deadline is None else deadline
        return None

    def _record(
        self,
        owner: bytes,
        ttl: float | None,
        waiters: object,
        took_over: bool,
        holder: FrameType | None,
    ) -> _Entry:
        """A new holder's record (its token minted now); *took_over* when the lease before it
        expired rather than was released. Caller holds _mutex."""
        token = next(self._tokens)
        if ttl is None:
            return [token, None, None, took_over, owner, waiters, holder]
        clock = self.clock
        # the wall clock first: a thread switch between the two reads may then only make the
        # holder's expires_at early, never later than the takeover
        wall = clock.time()
        return [token, wall + ttl, clock.monotonic() + ttl, took_over, owner, waiters, holder]

    def _claim(self, key: str, record: _Entry) -> _Entry:
        """Insert *record* for *key* if the key is free: the record now there (*record* when
        this claim won). Caller holds _mutex.

        A free key is only ever filled through this atomic ``setdefault`` (here and on the
        uncontended path, which holds no mutex), and only code holding the mutex removes or
        replaces a key's record: so under the mutex a held key stays held, and a claim can
        neither overwrite a record nor be overwritten."""
        return self._entries.setdefault(key, record)

    def _hand_off(
        self, key: str, entry: _Entry, *, took_over: bool = False, keep: bool = False
    ) -> bool:
        """Give *key* to its oldest live waiter (*took_over*: because *entry* expired): True.
        Else False, and the key is freed (or, with *keep*, left to the caller to replace).
        Caller holds _mutex."""
        waiters = entry[_WAITERS]
        while waiters:
            waiter, _ = waiters.popitem(last=False)
            successor = self._record(waiter.owner, waiter.ttl, waiters, took_over, waiter.holder)
            self._entries[key] = successor
            waiter.grant = successor  # laid out as a Grant
            if waiter.wake():
                if waiter.ttl is not None:
                    self._arm_head(successor)
                return True
            # its event loop is closed: nobody will ever release this grant, so pass it on
            waiter.grant = None
        if entry[_OWNER] is _LAPSED:
            self._lapsed -= 1
        if not keep:
            del self._entries[key]
        return False

    @staticmethod
    def _arm_head(entry: _Entry) -> None:
        """Make the oldest waiter wake when the holder's lease runs out. Caller holds _mutex."""
        deadline = entry[_DEADLINE]
        waiters = entry[_WAITERS]
        if deadline is not None and waiters:
            head = next(iter(waiters))
            if head.retry_at > deadline:
                head.retry_at = deadline
                head.wake()  # it may be sleeping with no retry time: let it re-read this one

    def _withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        with self._mutex:
            if waiter.grant is not None:
                return waiter.grant
            entry = self._entries.get(key)
            waiters = None if entry is None else entry[_WAITERS]
            if waiters and waiter in waiters:
                was_head = next(iter(waiters)) is waiter
                del waiters[waiter]
                if was_head:
                    self._arm_head(entry)  # type: ignore[arg-type]
            return None

    def permits(self, limit: int, weight: int = 1) -> Backend:
        """This backend's semaphore/RW view of shape ``(limit, weight)`` (cached per shape; all
        shapes share one permit table, separate from the lock keys): see
        :class:`~keylock.backends._permits.MemoryPermits`."""
        from ._permits import permit_view

        return permit_view(self, limit, weight, self.clock)

    # ------------------------------------------------------------------- release, extend

    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None or entry[_TOKEN] != token or entry[_OWNER] != owner:
                raise _lost(key, token)
            expired = self._release_contended(key, entry)
        if expired:
            raise _lost(key, token)

    def _release_contended(self, key: str, entry: _Entry) -> bool:
        """Hand *key* on (or free it) after a release; True if the lease had expired.

        Caller holds _mutex and has checked the token and owner.
        """
        deadline = entry[_DEADLINE]
        expired = deadline is not None and self.clock.monotonic() >= deadline
        self._end(key, entry, took_over=expired)
        return expired

    def _end(self, key: str, entry: _Entry, *, took_over: bool) -> None:
        """End *entry*'s lease: hand the key on. One that did not end by a live release
        (*took_over*) with nobody waiting leaves a lapsed record, so the next holder still
        learns it took the key over. Caller holds _mutex."""
        if took_over and not entry[_WAITERS]:
            if self._lapsed >= MAX_LAPSED:  # keys nobody came back for: forget them
                lapsed = [k for k, e in self._entries.items() if e[_OWNER] is _LAPSED]
                for forgotten in lapsed:
                    del self._entries[forgotten]
                self._lapsed = 0
            entry[_OWNER] = _LAPSED  # nobody's: no release or extend matches it any more
            entry[_DEADLINE] = -math.inf  # lapsed: the next caller takes it over
            entry[_HOLDER] = None
            self._lapsed += 1
            return
        self._hand_off(key, entry, took_over=took_over)

    def _discard_sync(self, key: str, owner: bytes, grant: Grant) -> None:
        """Give back a grant its waiter never used: the next holder inherits whether it took
        the key over (the compensation it owed is still owed)."""
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None or entry[_TOKEN] != grant[0] or entry[_OWNER] != owner:
                return
            deadline = entry[_DEADLINE]
            expired = deadline is not None and self.clock.monotonic() >= deadline
            self._end(key, entry, took_over=expired or entry[_TOOK_OVER])

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        with self._mutex:
            entry = self._entries.get(key)
            clock = self.clock
            wall = clock.time()  # first: see _record
            now = clock.monotonic()
            if entry is None or entry[_TOKEN] != token or entry[_OWNER] != owner:
                raise _lost(key, token)
            deadline = entry[_DEADLINE]
            if deadline is not None and now >= deadline:
                raise _lost(key, token)
            entry[_DEADLINE] = deadline = now + ttl
            entry[_EXPIRES_AT] = expires_at = wall + ttl
            self._arm_head(entry)
            return Grant(token, expires_at, deadline, entry[_TOOK_OVER])

    def statistics(self, key: str) -> KeyStatistics:
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None or entry[_OWNER] is _LAPSED:
                return KeyStatistics(key, held=False, token=None, owner=None, waiting=0)
            waiters = entry[_WAITERS]
            return KeyStatistics(
                key,
                held=True,
                token=entry[_TOKEN] or None,  # 0 for the instant between a claim and its mint
                owner=entry[_OWNER] or None,
                waiting=len(waiters) if waiters else 0,
            )


def _lost(key: str, token: int) -> LeaseLost:
    return LeaseLost(
        f"lease {token} on {key!r} was lost (its TTL ran out or it was already released): "
        "the critical section was not protected; reconcile before acting on its results",
        key=key,
    )


# Every memory backend of this process, so a forked child can start each afresh.
_BACKENDS: weakref.WeakSet[MemoryBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # in place: KeyedLock keeps the fast-path closures, which hold this very mutex and dict
    for backend in list(_BACKENDS):
        backend._mutex._at_fork_reinit()  # type: ignore[attr-defined]  # (as threading does)
        backend._entries.clear()
        backend._lapsed = 0


os.register_at_fork(after_in_child=_after_fork_in_child)
