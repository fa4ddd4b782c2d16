"""stale_guard: run a handler under its key's lock only if what it reacted to is still current."""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Literal, ParamSpec, TypeVar

from .errors import Superseded

if TYPE_CHECKING:
    from .registry import KeyedLock

__all__ = ["SUPERSEDED", "stale_guard"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("keylock")

#: Functions of the guarded handler's own arguments (any signature).
KeyFunc = Callable[..., str]  # type: ignore[explicit-any]
SnapshotFunc = Callable[..., object]  # type: ignore[explicit-any]


class _SupersededType:
    """The value a guarded call returns when it was dropped as stale (falsy, a singleton)."""

    _instance: _SupersededType | None = None

    def __new__(cls) -> _SupersededType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "keylock.SUPERSEDED"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "SUPERSEDED"


#: Returned by a ``stale_guard``-ed function whose call was dropped.
SUPERSEDED: Final = _SupersededType()


class _Completions:
    """Per key: calls in flight, and the sequence number of the last completed call.

    State for a key exists only while a call for it is in flight: a call arriving later has a
    higher sequence number than any earlier completion, so forgetting them is safe.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._seq = itertools.count(1)  # guarded by _mutex
        self._keys: dict[str, list[int]] = {}  # key -> [in flight, last completion]; _mutex

    def arrive(self, key: str) -> int:
        with self._mutex:
            state = self._keys.get(key)
            if state is None:
                self._keys[key] = [1, 0]
            else:
                state[0] += 1
            return next(self._seq)

    def superseded(self, key: str, arrived: int) -> bool:
        with self._mutex:
            return self._keys[key][1] > arrived

    def complete(self, key: str) -> None:
        """Record a successful call; the caller still holds the key's lock, so the next holder
        (woken by the release, maybe in another thread) is sure to see it."""
        with self._mutex:
            self._keys[key][1] = next(self._seq)

    def leave(self, key: str) -> None:
        with self._mutex:
            state = self._keys[key]
            state[0] -= 1
            if state[0] == 0:
                del self._keys[key]


def stale_guard(
    locks: KeyedLock,
    *,
    key: KeyFunc,
    snapshot: SnapshotFunc | None = None,
    on_stale: Literal["return", "raise"] = "return",
    timeout: float | None = None,
    ttl: float | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R | _SupersededType]]:
    """Run the handler under *key*'s lock, unless the situation changed while it waited.

    With *snapshot*, it is read at entry and again under the lock; if the two differ the call is
    dropped. Without it, a call is dropped when another call for the same key completed
    successfully after this one arrived (a burst of identical failures is handled once; that
    bookkeeping is per process). A dropped call returns :data:`SUPERSEDED`, or raises
    :class:`~keylock.Superseded` with ``on_stale="raise"``; each drop is logged on the
    ``keylock`` logger. Works on sync and async functions (an async *snapshot* may be awaited).
    """
    if on_stale not in ("return", "raise"):
        raise ValueError(f"on_stale must be 'return' or 'raise', not {on_stale!r}")
    if not callable(key):
        raise TypeError("stale_guard(key=...) takes a function of the call's arguments")
    completions = _Completions()

    def dropped(k: str, why: str) -> _SupersededType:
        logger.info("keylock: dropped stale call for %r: %s", k, why)
        observer = locks.observer
        if observer is not None:
            observer.superseded(observer.prefix_of(k))
        if on_stale == "raise":
            raise Superseded(f"call for {k!r} was superseded: {why}", key=k)
        return SUPERSEDED

    def decorate(fn: Callable[P, R]) -> Callable[P, R | _SupersededType]:
        if inspect.iscoroutinefunction(fn):
            afn = fn

            @functools.wraps(fn)
            async def aguarded(*args: P.args, **kwargs: P.kwargs) -> object:
                k = key(*args, **kwargs)
                if snapshot is not None:
                    before = await _maybe_await(snapshot(*args, **kwargs))
                    async with locks(k, timeout=timeout, ttl=ttl):
                        after = await _maybe_await(snapshot(*args, **kwargs))
                        if after != before:
                            return dropped(k, f"snapshot changed from {before!r} to {after!r}")
                        return await afn(*args, **kwargs)
                arrived = completions.arrive(k)
                try:
                    async with locks(k, timeout=timeout, ttl=ttl):
                        if completions.superseded(k, arrived):
                            return dropped(k, "another call completed after this one arrived")
                        result = await afn(*args, **kwargs)
                        completions.complete(k)  # before the release: see complete()
                        return result
                finally:
                    completions.leave(k)

            return aguarded  # type: ignore[return-value]

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R | _SupersededType:
            k = key(*args, **kwargs)
            if snapshot is not None:
                before = snapshot(*args, **kwargs)
                with locks.sync(k, timeout=timeout, ttl=ttl):
                    after = snapshot(*args, **kwargs)
                    if after != before:
                        return dropped(k, f"snapshot changed from {before!r} to {after!r}")
                    return fn(*args, **kwargs)
            arrived = completions.arrive(k)
            try:
                with locks.sync(k, timeout=timeout, ttl=ttl):
                    if completions.superseded(k, arrived):
                        return dropped(k, "another call completed after this one arrived")
                    result = fn(*args, **kwargs)
                    completions.complete(k)  # before the release: see complete()
                    return result
            finally:
                completions.leave(k)

        return guarded

    return decorate


async def _maybe_await(value: object) -> object:
    if inspect.isawaitable(value):
        return await value
    return value
