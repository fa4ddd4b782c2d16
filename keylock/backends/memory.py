"""In-process leases: one dict under one ``threading.Lock``, with a FIFO queue per held key."""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from threading import Lock

from ..errors import LeaseLost
from .base import Backend, Grant, KeyStatistics, Waiter

__all__ = ["MemoryBackend"]


class _Entry:
    """A held key. Exists exactly while the key is held; waiters only queue behind a holder."""

    __slots__ = ("deadline", "owner", "token", "waiters")

    def __init__(self, owner: bytes, token: int, deadline: float | None) -> None:
        self.owner = owner
        self.token = token  # the live lease's token; the only proof of ownership in-process
        self.deadline = deadline  # time.monotonic() at which the lease expires; None = never
        # FIFO of waiters (dict for O(1) removal on cancel); never holds a granted waiter
        self.waiters: OrderedDict[Waiter, None] | None = None


class MemoryBackend(Backend):
    """Per-key leases within one process, shared by asyncio tasks, threads and event loops.

    Hand-off is FIFO (a releasing holder gives the key straight to the oldest waiter, so
    nobody barges). Per-key state is freed as soon as a key is neither held nor awaited.
    Tokens come from one counter per backend, so they increase per key and are never reused.
    With a TTL, an expired lease is taken over by the next caller or waiter, and its holder's
    release raises :class:`~keylock.LeaseLost`.
    """

    def __init__(self, *, ttl: float | None = None) -> None:
        self.default_ttl = ttl
        self._mutex = Lock()  # guards _entries and every _Entry; held only for O(1) work
        self._entries: dict[str, _Entry] = {}  # guarded by _mutex; only held keys
        self._tokens = itertools.count(1)  # guarded by _mutex

    def __repr__(self) -> str:
        return f"MemoryBackend(held={len(self._entries)})"

    # ------------------------------------------------------------------------------- step

    def _try_acquire(
        self, key: str, owner: bytes, ttl: float | None, waiter: Waiter | None
    ) -> Grant | None:
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None:
                token = next(self._tokens)
                if ttl is None:
                    self._entries[key] = _Entry(owner, token, None)
                    return Grant(token, None)
                self._entries[key] = _Entry(owner, token, time.monotonic() + ttl)
                return Grant(token, time.time() + ttl)
            if entry.deadline is not None and time.monotonic() >= entry.deadline:
                # the holder's lease ran out: the key goes to the oldest waiter, else to us
                self._hand_off(key, entry)
                if waiter is not None and waiter.grant is not None:
                    return waiter.grant
                if key not in self._entries:
                    return self._grant_new(key, owner, ttl)
                entry = self._entries[key]
            if waiter is None:
                return None
            if entry.waiters is None:
                entry.waiters = OrderedDict()
            entry.waiters[waiter] = None  # no-op when already queued: keeps its place
            waiter.retry_at = math.inf if entry.deadline is None else entry.deadline
            return None

    def _grant_new(self, key: str, owner: bytes, ttl: float | None) -> Grant:
        token = next(self._tokens)
        deadline = None if ttl is None else time.monotonic() + ttl
        self._entries[key] = _Entry(owner, token, deadline)
        return Grant(token, None if ttl is None else time.time() + ttl)

    def _hand_off(self, key: str, entry: _Entry) -> None:
        """Give *key* to its oldest waiter, or free it. Caller holds _mutex."""
        waiters = entry.waiters
        if not waiters:
            del self._entries[key]
            return
        waiter, _ = waiters.popitem(last=False)
        ttl = waiter.ttl
        entry.owner = waiter.owner
        entry.token = token = next(self._tokens)
        if ttl is None:
            entry.deadline = None
            waiter.grant = Grant(token, None)
        else:
            entry.deadline = time.monotonic() + ttl
            waiter.grant = Grant(token, time.time() + ttl)
            self._arm_head(entry)
        waiter.wake()

    @staticmethod
    def _arm_head(entry: _Entry) -> None:
        """Make the oldest waiter wake when the holder's lease runs out. Caller holds _mutex."""
        if entry.deadline is not None and entry.waiters:
            head = next(iter(entry.waiters))
            if head.retry_at > entry.deadline:
                head.retry_at = entry.deadline
                head.wake()  # it may be sleeping with no retry time: let it re-read this one

    def _withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        with self._mutex:
            if waiter.grant is not None:
                return waiter.grant
            entry = self._entries.get(key)
            if entry is not None and entry.waiters and waiter in entry.waiters:
                was_head = next(iter(entry.waiters)) is waiter
                del entry.waiters[waiter]
                if was_head:
                    self._arm_head(entry)
            return None

    # ------------------------------------------------------------------- release, extend

    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None or entry.token != token:
                raise _lost(key, token)
            expired = entry.deadline is not None and time.monotonic() >= entry.deadline
            self._hand_off(key, entry)
        if expired:
            raise _lost(key, token)

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> float:
        with self._mutex:
            entry = self._entries.get(key)
            now = time.monotonic()
            if (
                entry is None
                or entry.token != token
                or (entry.deadline is not None and now >= entry.deadline)
            ):
                raise _lost(key, token)
            entry.deadline = now + ttl
            self._arm_head(entry)
            return time.time() + ttl

    def statistics(self, key: str) -> KeyStatistics:
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None:
                return KeyStatistics(key, held=False, token=None, owner=None, waiting=0)
            waiting = len(entry.waiters) if entry.waiters else 0
            return KeyStatistics(
                key, held=True, token=entry.token, owner=entry.owner, waiting=waiting
            )

    def __len__(self) -> int:
        """How many keys are held now (for leak checks)."""
        return len(self._entries)


def _lost(key: str, token: int) -> LeaseLost:
    return LeaseLost(
        f"lease {token} on {key!r} was lost (its TTL ran out or it was already released): "
        "the critical section was not protected; reconcile before acting on its results",
        key=key,
    )
