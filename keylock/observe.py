"""Observability: hooks that see every acquire, release, timeout, loss, renewal, drop and
coalesced call, grouped by key prefix; in-process counters; an OpenTelemetry adapter.

A ``KeyedLock`` or ``SingleFlight`` built without an observer runs no observability code at
all (its hot path is the same object code as before hooks existed); one built with an observer
calls it synchronously, so observer methods must be cheap and must not raise.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["COUNTERS", "Counters", "Observer", "PrefixStats", "stats"]


#: The group of keys without a ``:`` (ids, UUIDs): one bucket, so labels stay bounded.
NO_PREFIX = "(none)"
#: At most this many groups per Counters; later new ones are counted under OTHER_PREFIXES.
MAX_PREFIXES = 1000
OTHER_PREFIXES = "(other)"


def default_prefix(key: str) -> str:
    """The part of *key* before its first ``:`` (``"agent:42"`` -> ``"agent"``); keys without
    one share the bucket ``"(none)"``, so a key per id never makes a group per id."""
    head, colon, _ = key.partition(":")
    return head if colon else NO_PREFIX


class Observer:
    """Receives keylock events; override the methods you need (each default does nothing).

    Times are in seconds. *prefix* groups keys (see ``prefix_of``), so a metric backend sees a
    bounded set of label values however many keys there are.
    """

    #: Maps a key to its metrics group; override or pass ``prefix_of=`` to change it.
    prefix_of: Callable[[str], str] = staticmethod(default_prefix)

    def acquired(self, prefix: str, waited: float, *, contended: bool | None) -> None:
        """A lease was granted after *waited* seconds; *contended* if it had to queue (a
        hand-off), None where the backend cannot tell (remote backends)."""

    def released(self, prefix: str, held: float) -> None:
        """A lease was released after being held *held* seconds."""

    def timed_out(self, prefix: str, waited: float) -> None:
        """An acquire gave up after *waited* seconds (LockTimeout)."""

    def lost(self, prefix: str) -> None:
        """A lease was found lost (expired, taken over, or renewal failed)."""

    def renewed(self, prefix: str) -> None:
        """A lease was renewed in the background."""

    def superseded(self, prefix: str) -> None:
        """A ``stale_guard`` call was dropped."""

    def coalesced(self, prefix: str) -> None:
        """A ``SingleFlight`` caller joined a run already in flight instead of starting one."""


_BLOCK_HOOKS = ("acquired", "released", "timed_out")


def watches_blocks(observer: Observer) -> bool:
    """True if *observer* does something on acquire, release or timeout (overrides a hook):
    a lock whose observer does not runs no observer code on those paths at all."""
    for name in _BLOCK_HOOKS:
        if name in getattr(observer, "__dict__", {}):  # set on the instance
            return True
        if getattr(type(observer), name) is not getattr(Observer, name):
            return True
    return False


@dataclass
class PrefixStats:
    """Counters for one key prefix (a snapshot when returned by ``Counters.snapshot``)."""

    acquired: int = 0
    contended: int = 0  # acquisitions that had to queue: hand-offs
    released: int = 0
    timed_out: int = 0
    lost: int = 0
    renewed: int = 0
    superseded: int = 0
    coalesced: int = 0
    wait_seconds: float = 0.0  # total time spent waiting by acquisitions that succeeded
    hold_seconds: float = 0.0  # total time leases were held until released
    max_wait_seconds: float = 0.0


@dataclass
class Counters(Observer):
    """In-process counters per key prefix; thread-safe. ``snapshot()`` copies them out."""

    _stats: dict[str, PrefixStats] = field(default_factory=dict)
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    def _of(self, prefix: str) -> PrefixStats:
        stats = self._stats.get(prefix)
        if stats is None:
            if len(self._stats) >= MAX_PREFIXES:  # a custom prefix_of with unbounded output
                prefix = OTHER_PREFIXES
                stats = self._stats.get(prefix)
            if stats is None:
                stats = self._stats[prefix] = PrefixStats()
        return stats

    def acquired(self, prefix: str, waited: float, *, contended: bool | None) -> None:
        with self._mutex:
            stats = self._of(prefix)
            stats.acquired += 1
            stats.contended += bool(contended)
            stats.wait_seconds += waited
            stats.max_wait_seconds = max(stats.max_wait_seconds, waited)

    def released(self, prefix: str, held: float) -> None:
        with self._mutex:
            stats = self._of(prefix)
            stats.released += 1
            stats.hold_seconds += held

    def timed_out(self, prefix: str, waited: float) -> None:
        with self._mutex:
            self._of(prefix).timed_out += 1

    def lost(self, prefix: str) -> None:
        with self._mutex:
            self._of(prefix).lost += 1

    def renewed(self, prefix: str) -> None:
        with self._mutex:
            self._of(prefix).renewed += 1

    def superseded(self, prefix: str) -> None:
        with self._mutex:
            self._of(prefix).superseded += 1

    def coalesced(self, prefix: str) -> None:
        with self._mutex:
            self._of(prefix).coalesced += 1

    def snapshot(self) -> dict[str, PrefixStats]:
        """A copy of every prefix's counters."""
        with self._mutex:
            return {prefix: PrefixStats(**vars(s)) for prefix, s in self._stats.items()}

    def reset(self) -> None:
        """Forget every counter."""
        with self._mutex:
            self._stats.clear()


#: Process-wide counters: pass ``observer=keylock.COUNTERS`` and read them with ``stats()``.
COUNTERS = Counters()


def stats() -> dict[str, PrefixStats]:
    """A snapshot of the process-wide :data:`COUNTERS`, per key prefix."""
    return COUNTERS.snapshot()


class Fanout(Observer):
    """Sends every event to several observers, in order."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def acquired(self, prefix: str, waited: float, *, contended: bool | None) -> None:
        for observer in self.observers:
            observer.acquired(prefix, waited, contended=contended)

    def released(self, prefix: str, held: float) -> None:
        for observer in self.observers:
            observer.released(prefix, held)

    def timed_out(self, prefix: str, waited: float) -> None:
        for observer in self.observers:
            observer.timed_out(prefix, waited)

    def lost(self, prefix: str) -> None:
        for observer in self.observers:
            observer.lost(prefix)

    def renewed(self, prefix: str) -> None:
        for observer in self.observers:
            observer.renewed(prefix)

    def superseded(self, prefix: str) -> None:
        for observer in self.observers:
            observer.superseded(prefix)

    def coalesced(self, prefix: str) -> None:
        for observer in self.observers:
            observer.coalesced(prefix)
