"""The holds of an observed lock: ``locks(key)`` / ``locks.sync(key)`` reporting to the lock's
observer. A lock whose observer overrides none of the acquire, release and timeout hooks uses
the plain holds of :mod:`._holds` instead, and runs no observer code in its blocks at all.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ._holds import AsyncHold, SyncHold, _frame, _Hold
from .errors import LockTimeout
from .lease import _QUEUED, _SLOW_EXIT, Lease
from .observe import GROUPS_REMEMBERED

if TYPE_CHECKING:
    from collections.abc import Awaitable
    from types import FrameType, TracebackType

    from .observe import BlockHooks, PrefixStats

__all__ = ["_ObservedAsync", "_ObservedSync"]

logger = logging.getLogger("keylock")
_now = time.perf_counter


class _Observed(_Hold):
    """Reports to the lock's observer: wait, hold time, timeouts, through the hooks resolved
    once for the lock (a hook the observer does not override costs nothing, nor the clock
    read only it needed). An observer that raises is logged and ignored: it never costs a
    grant or a release. The release is reported on the same fast exit an unobserved block
    takes (no coroutine, when the release never waits).

    A lock observed by a plain :class:`~keylock.Counters` counts a block granted at once
    straight into the thread's counters of the key's group (``BlockHooks.tallies``): one
    lookup per block, no hook call; the block's own exit, on the same thread, counts its
    release into the same counters. Any other grant or release goes through the hooks.
    """

    __slots__ = ("_group", "_since", "_stats")

    _group: str | None  # the key's group, resolved once per block
    _since: float  # when the lease was granted (when the release is watched)
    # Counters only: the granting thread's counters of the group, which the block's exit
    # (on that same thread) counts its release into; None: the exit calls the hook
    _stats: PrefixStats | None

    def _timed_out(self, start: float) -> None:
        hooks: BlockHooks = self._host.hooks  # type: ignore[assignment]  # (observed: set)
        if hooks.timed_out is not None:
            waited = _now() - start
            try:
                hooks.timed_out(hooks.prefix_of(self.key), waited)
            except Exception:
                logger.exception("keylock: Observer.timed_out raised")

    def _acquired(self, start: float) -> None:
        """Report the grant; *start* is when its wait began (0.0: granted at once, which is
        reported as no wait, not contended)."""
        hooks: BlockHooks = self._host.hooks  # type: ignore[assignment]  # (observed: set)
        self._stats = None
        groups = hooks.groups
        group = self._group = None if groups is None else groups.get(self.key)
        if start:
            now = self._since = _now()
            waited = now - start
            contended = bool(self._state & _QUEUED) if self._host.inline else None
        else:  # (a clock read only for the hold time, if that is watched)
            self._since = _now() if hooks.released is not None else 0.0
            waited = 0.0
            contended = False
        try:
            if group is None:
                group = self._group = _group_of(hooks, self.key)
            if hooks.acquired is not None:
                hooks.acquired(group, waited, contended=contended)
        except Exception:
            logger.exception("keylock: Observer.acquired raised")

    def _released(self) -> None:
        hooks: BlockHooks = self._host.hooks  # type: ignore[assignment]  # (observed: set)
        if hooks.released is not None:
            held = _now() - self._since
            try:
                group = self._group
                hooks.released(_group_of(hooks, self.key) if group is None else group, held)
            except Exception:
                logger.exception("keylock: Observer.released raised")

    async def release(self) -> None:
        try:
            await _Hold.release(self)
        finally:
            self._released()

    def release_sync(self) -> None:
        try:
            _Hold.release_sync(self)
        finally:
            self._released()

    # The exits are Lease's own (one place for the release and its errors), with the report
    # around them; one through release() / release_sync() is reported there.

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state >= _SLOW_EXIT:  # through release_sync()
            return Lease.__exit__(self, exc_type, exc, tb)
        try:
            return Lease.__exit__(self, exc_type, exc, tb)
        finally:
            self._exited()

    def _exit_async(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[None]:
        if self._state >= _SLOW_EXIT or not self._host.inline:  # through release()
            return Lease._exit_async(self, exc_type, exc, tb)
        try:  # (Lease's fast exit: it releases now and returns a done awaitable)
            return Lease._exit_async(self, exc_type, exc, tb)
        finally:
            self._exited()

    def _exited(self) -> None:
        """Report the release of a fast exit."""
        stats = self._stats
        if stats is None:
            self._released()
        else:  # Counters.released(group, held), into the counters that counted the grant
            stats.released += 1
            stats.hold_seconds += _now() - self._since

    if not TYPE_CHECKING:
        __aexit__ = _exit_async


class _ObservedAsync(_Observed, AsyncHold):
    __slots__ = ()

    async def __aenter__(self) -> Lease:
        if self._enter(2) is None:
            start = _now()
            try:
                await self._wait(_frame(1))
            except LockTimeout:
                self._timed_out(start)
                raise
            self._acquired(start)
            return self
        hooks: BlockHooks = self._host.hooks  # type: ignore[assignment]  # (observed: set)
        tallies = hooks.tallies
        if tallies is not None:  # a plain Counters: count the grant here (see _Observed)
            group = hooks.groups.get(self.key)  # type: ignore[union-attr]  # (set with tallies)
            if group is None:  # (the default prefix_of: it never raises)
                group = _group_of(hooks, self.key)
            self._group = group
            try:
                stats = tallies.tally[group]  # (once this thread counted the group)
            except (AttributeError, KeyError):
                pass
            else:  # Counters.acquired(group, 0.0, contended=False), without the call
                stats.acquired += 1
                self._stats = stats
                self._since = _now()
                return self
        self._acquired(0.0)
        return self


class _ObservedSync(_Observed, SyncHold):
    __slots__ = ()

    def __enter__(self) -> Lease:
        self._since = 0.0  # _queue sets when the wait began, if it has to wait
        self._enter(2)
        start = self._since
        if not start:
            hooks: BlockHooks = self._host.hooks  # type: ignore[assignment]  # (observed: set)
            tallies = hooks.tallies
            if tallies is not None:  # (as _ObservedAsync.__aenter__)
                group = hooks.groups.get(self.key)  # type: ignore[union-attr]
                if group is None:
                    group = _group_of(hooks, self.key)
                self._group = group
                try:
                    stats = tallies.tally[group]
                except (AttributeError, KeyError):
                    pass
                else:
                    stats.acquired += 1
                    self._stats = stats
                    self._since = _now()
                    return self
        self._acquired(start)
        return self

    def _queue(self, holder: FrameType) -> Lease:
        self._since = start = _now()
        try:
            self._wait(holder)
        except LockTimeout:
            self._timed_out(start)
            raise
        return self


def _group_of(hooks: BlockHooks, key: str) -> str:
    """*key*'s group by the observer's ``prefix_of``, remembered when that is the default."""
    group = hooks.prefix_of(key)
    groups = hooks.groups
    if groups is not None and len(groups) < GROUPS_REMEMBERED:
        groups[key] = group
    return group
