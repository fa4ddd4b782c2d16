"""Observability: hooks that see every acquire, release, timeout, loss, renewal, drop and
coalesced call, grouped by key prefix; in-process counters; an OpenTelemetry adapter.

A ``KeyedLock`` or ``SingleFlight`` built without an observer runs no observability code at
all (its hot path is the same object code as before hooks existed); one built with an observer
calls it synchronously, so observer methods must be cheap and must not raise.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["COUNTERS", "BlockHooks", "Counters", "Observer", "PrefixStats", "stats"]


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
        """A lease was granted after *waited* seconds (0.0 when the key was free at once);
        *contended* if it had to queue (a hand-off), None where the backend cannot tell
        (remote backends)."""

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


#: Keys whose group the default ``prefix_of`` is remembered for, per lock (beyond, it is
#: recomputed: a key per id never grows the memo past this).
GROUPS_REMEMBERED = 1024


class BlockHooks:
    """An observer's acquire/release/timeout hooks, resolved once per lock: each is None when
    the observer does not override it, and a block then skips it and the clock reads only it
    needed. The default ``prefix_of`` is remembered per key (``groups``)."""

    __slots__ = ("acquired", "groups", "prefix_of", "released", "tallies", "timed_out")

    def __init__(self, observer: Observer) -> None:
        self.acquired = observer.acquired if _overrides(observer, "acquired") else None
        self.released = observer.released if _overrides(observer, "released") else None
        self.timed_out = observer.timed_out if _overrides(observer, "timed_out") else None
        self.prefix_of: Callable[[str], str] = observer.prefix_of
        #: key -> group, when prefix_of is the default (a pure function of the key)
        self.groups: dict[str, str] | None = {} if self.prefix_of is default_prefix else None
        #: a Counters that counts blocks as Counters does (its own acquired and released, the
        #: default prefix_of): its per-thread tallies (``tallies.tally``: this thread's
        #: {group: PrefixStats}, absent until the thread's first event). A block granted at
        #: once counts into them itself, as the hooks would (see ``Counters.acquired``).
        self.tallies: threading.local | None = None
        if (
            isinstance(observer, Counters)
            and self.groups is not None
            and not _overrides(observer, "acquired", Counters)
            and not _overrides(observer, "released", Counters)
        ):
            self.tallies = observer._local

    @classmethod
    def of(cls, observer: Observer | None) -> BlockHooks | None:
        """The hooks of *observer*, or None when it overrides none of them: a lock then runs
        no observer code on acquire, release or timeout at all."""
        if observer is None:
            return None
        hooks = cls(observer)
        if hooks.acquired is None and hooks.released is None and hooks.timed_out is None:
            return None
        return hooks


def _overrides(observer: Observer, name: str, base: type[Observer] | None = None) -> bool:
    """True if *observer* has a hook *name* of its own: not *base*'s (default: Observer's,
    which does nothing)."""
    if name in getattr(observer, "__dict__", {}):  # set on the instance
        return True
    return getattr(type(observer), name) is not getattr(base or Observer, name)


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

    def add(self, other: PrefixStats) -> None:
        """Add *other*'s counts to these (the largest wait stays the largest)."""
        for name, value in vars(other).items():
            if name == "max_wait_seconds":
                self.max_wait_seconds = max(self.max_wait_seconds, value)
            else:
                setattr(self, name, getattr(self, name) + value)


_Tally = dict[str, PrefixStats]  # one thread's counters per prefix


class _Seat:
    """Kept in one thread's local storage: its end (the thread's) retires that thread's tally."""

    __slots__ = ("__weakref__",)


class Counters(Observer):
    """In-process counters per key prefix; thread-safe. ``snapshot()`` copies them out.

    Each thread counts into a tally of its own, without a lock (only its first event per
    prefix takes one); a snapshot adds the tallies up, and a thread's tally joins the retired
    totals when the thread ends. An event racing ``reset()`` may be lost."""

    def __init__(self) -> None:
        # guards the lists and every tally's set of prefixes (reentrant: a thread's end may
        # retire its tally from inside another call that holds it)
        self._mutex = threading.RLock()
        self._local = threading.local()  # .tally: this thread's _Tally; .seat: see _Seat
        self._tallies: list[_Tally] = []  # every live thread's tally
        self._retired: _Tally = {}  # what threads that ended counted
        self._prefixes: set[str] = set()  # every group counted, at most MAX_PREFIXES

    def _mine(self, prefix: str) -> PrefixStats:
        """This thread's counters for *prefix* (created on first use)."""
        with self._mutex:
            tally: _Tally | None = getattr(self._local, "tally", None)
            if tally is None:
                tally = self._local.tally = {}
                self._tallies.append(tally)
                self._local.seat = seat = _Seat()
                weakref.finalize(seat, self._retire, tally)
            if prefix not in self._prefixes:
                if len(self._prefixes) >= MAX_PREFIXES:  # a custom prefix_of, unbounded output
                    prefix = OTHER_PREFIXES
                self._prefixes.add(prefix)
            stats = tally.get(prefix)
            if stats is None:
                stats = tally[prefix] = PrefixStats()
            return stats

    def _retire(self, tally: _Tally) -> None:
        with self._mutex:
            self._tallies.remove(tally)
            _merge(self._retired, tally)

    # A KeyedLock block granted at once, and its release on the fast exit, count into the
    # thread's PrefixStats without calling these two (keylock._observed): what they add for
    # such a block (acquired + 1; released + 1, hold_seconds + held) must stay what they do.
    def acquired(self, prefix: str, waited: float, *, contended: bool | None) -> None:
        try:
            stats = self._local.tally[prefix]
        except (AttributeError, KeyError):
            stats = self._mine(prefix)
        stats.acquired += 1
        if contended:
            stats.contended += 1
        if waited:
            stats.wait_seconds += waited
            if waited > stats.max_wait_seconds:
                stats.max_wait_seconds = waited

    def released(self, prefix: str, held: float) -> None:
        try:
            stats = self._local.tally[prefix]
        except (AttributeError, KeyError):
            stats = self._mine(prefix)
        stats.released += 1
        stats.hold_seconds += held

    def timed_out(self, prefix: str, waited: float) -> None:
        self._mine(prefix).timed_out += 1

    def lost(self, prefix: str) -> None:
        self._mine(prefix).lost += 1

    def renewed(self, prefix: str) -> None:
        self._mine(prefix).renewed += 1

    def superseded(self, prefix: str) -> None:
        self._mine(prefix).superseded += 1

    def coalesced(self, prefix: str) -> None:
        self._mine(prefix).coalesced += 1

    def snapshot(self) -> dict[str, PrefixStats]:
        """A copy of every prefix's counters."""
        total: _Tally = {}
        with self._mutex:
            for tally in (self._retired, *self._tallies):
                _merge(total, tally)
        return total

    def reset(self) -> None:
        """Forget every counter."""
        with self._mutex:
            self._retired.clear()
            for tally in self._tallies:
                tally.clear()
            self._prefixes.clear()


def _merge(into: _Tally, tally: _Tally) -> None:
    for prefix, stats in tally.items():
        mine = into.get(prefix)
        if mine is None:
            mine = into[prefix] = PrefixStats()
        mine.add(stats)


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
