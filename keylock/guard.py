"""stale_guard: run a handler under its key's lock only if what it reacted to is still current."""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Literal, ParamSpec, TypeVar, cast

from ._callables import describe, is_async_callable, key_misfit, refuse_awaitable
from ._completions import for_lock
from ._host import report
from ._validate import check_key
from .errors import KeylockError, Superseded

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


def stale_guard(
    locks: KeyedLock,
    *,
    key: KeyFunc,
    snapshot: SnapshotFunc | None = None,
    expected: SnapshotFunc | None = None,
    on_stale: Literal["return", "raise"] = "return",
    timeout: float | None = None,
    ttl: float | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R | _SupersededType]]:
    """Run the handler under *key*'s lock, unless the situation changed while it waited.

    *locks* must be exclusive (a KeyedLock, a KeyedSemaphore of limit 1, a KeyedRWLock's
    ``writer``); a lock several calls may hold at once is refused with TypeError.

    Three ways to tell (*snapshot* and *expected* are functions of the call's arguments, sync
    or async; an async one needs an async handler):

    - ``expected`` and ``snapshot``: the call runs only if the state read under the lock
      (*snapshot*) equals what the event saw (*expected*), e.g. ``expected=lambda agent,
      failed: failed, snapshot=lambda agent, failed: current_subscription(agent)``. The form
      for events that may arrive late: a failure of A reported after the switch to B is
      dropped.
    - ``snapshot`` alone: read at entry and again under the lock; the call is dropped if they
      differ (a burst that arrives together is handled once; a late event is not caught).
    - neither: a call is dropped when another call of this function for the same key
      completed successfully after this one arrived. The count of completions lives where the
      lock does: in this process for MemoryBackend, in the lock directory for FileBackend, in
      Redis for RedisBackend, so a burst across processes is handled once (see
      ``keylock._completions``).

    Values are the same when they are the same object (``is``), both NaN floats, or ``==``;
    a value whose ``==`` raises (or has no truth value) raises TypeError (return a comparable value,
    e.g. a tuple of fields). An object without ``__eq__`` (a fresh ORM row) is equal only to
    itself. A dropped call returns :data:`SUPERSEDED`, or raises :class:`~keylock.Superseded`
    with ``on_stale="raise"``; each drop is logged on the ``keylock`` logger with its key,
    never with the values compared (they may hold secrets). A handler that returns an
    awaitable without being recognisably async is refused with TypeError (see
    :func:`keylock._callables.is_async_callable`).
    """
    if on_stale not in ("return", "raise"):
        raise ValueError(f"on_stale must be 'return' or 'raise', not {on_stale!r}")
    shape = getattr(locks._backend, "shape", None)  # (a permit view's: limit, weight)
    if shape is not None and shape.weight < shape.limit:
        raise TypeError(
            "stale_guard needs an exclusive lock, and this one lets several calls hold a key "
            f"at once (permits of weight {shape.weight} in a limit of {shape.limit}: what one "
            "reads under it another may be changing): pass a KeyedLock, a KeyedSemaphore of "
            "limit 1, or a KeyedRWLock's writer"
        )
    if not callable(key):
        raise TypeError("stale_guard(key=...) takes a function of the call's arguments")
    for name, given in (("snapshot", snapshot), ("expected", expected)):
        if given is not None and not callable(given):
            raise TypeError(f"stale_guard({name}=...) takes a function of the call's arguments")
    if expected is not None and snapshot is None:
        raise TypeError(
            "stale_guard(expected=...) needs snapshot=...: the current state, read under the "
            "lock and compared with what the event expected"
        )

    def dropped(k: str, why: str) -> _SupersededType:
        logger.info("keylock: dropped stale call for %r: %s", k, why)
        observer = locks.observer
        if observer is not None:
            report("Observer.superseded", lambda: observer.superseded(observer.prefix_of(k)))
        if on_stale == "raise":
            raise Superseded(f"call for {k!r} was superseded: {why}", key=k)
        return SUPERSEDED

    def read_misfit(
        exc: TypeError,
        function: SnapshotFunc,
        fn: object,
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> TypeError | None:
        """What a snapshot= or expected= *function* that raised *exc* is told instead (see
        key_misfit: None unless the call itself did not fit)."""
        role = "expected" if function is expected else "snapshot"
        return key_misfit(exc, function, fn, args, kwargs, "stale_guard", role)

    def decorate(fn: Callable[P, R]) -> Callable[P, R | _SupersededType]:
        name = describe(fn)
        completions = for_lock(locks, name) if snapshot is None else None
        if is_async_callable(fn):
            afn = cast("Callable[P, Awaitable[R]]", fn)

            async def aread(function: SnapshotFunc, *args: object, **kwargs: object) -> object:
                try:
                    return await _maybe_await(function(*args, **kwargs))
                except TypeError as exc:  # (as for key=: decided only once the call raised)
                    if (wrong := read_misfit(exc, function, fn, args, kwargs)) is None:
                        raise
                    raise wrong from None

            @functools.wraps(fn)
            async def aguarded(*args: P.args, **kwargs: P.kwargs) -> object:
                try:
                    k = check_key(key(*args, **kwargs))
                except TypeError as exc:  # (a try costs a call nothing until it raises)
                    if (misfit := key_misfit(exc, key, fn, args, kwargs, "stale_guard")) is None:
                        raise
                    raise misfit from None
                if snapshot is not None:
                    reads = snapshot if expected is None else expected
                    before = await aread(reads, *args, **kwargs)
                    async with locks(k, timeout=timeout, ttl=ttl):
                        after = await aread(snapshot, *args, **kwargs)
                        if not _same(k, before, after):
                            return dropped(k, _why(expected))
                        return await _maybe_await(afn(*args, **kwargs))
                assert completions is not None
                arrived = await completions.arrive(k)
                try:
                    async with locks(k, timeout=timeout, ttl=ttl):
                        if await completions.completed_since(k, arrived):
                            return dropped(k, _COMPLETED)
                        result = await _maybe_await(afn(*args, **kwargs))
                        try:  # before the release: the next holder must see it
                            await completions.complete(k)
                        except KeylockError as exc:
                            _not_counted(k, exc)
                        return result
                finally:
                    completions.leave(k)

            return aguarded  # type: ignore[return-value]

        for what, given in (("snapshot", snapshot), ("expected", expected)):
            if given is not None and is_async_callable(given):
                raise TypeError(
                    f"stale_guard on the sync function {name}: {what}= is async; give a sync "
                    "one, or make the handler async def"
                )

        def read(function: SnapshotFunc, *args: object, **kwargs: object) -> object:
            try:
                value = function(*args, **kwargs)
            except TypeError as exc:  # (as for key=: decided only once the call raised)
                if (wrong := read_misfit(exc, function, fn, args, kwargs)) is None:
                    raise
                raise wrong from None
            _refuse(function, value)
            return value

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R | _SupersededType:
            try:
                k = check_key(key(*args, **kwargs))
            except TypeError as exc:
                if (misfit := key_misfit(exc, key, fn, args, kwargs, "stale_guard")) is None:
                    raise
                raise misfit from None
            if snapshot is not None:
                before = read(snapshot if expected is None else expected, *args, **kwargs)
                with locks.sync(k, timeout=timeout, ttl=ttl):
                    after = read(snapshot, *args, **kwargs)
                    if not _same(k, before, after):
                        return dropped(k, _why(expected))
                    result = fn(*args, **kwargs)
                    refuse_awaitable(fn, result, "stale_guard")
                    return result
            assert completions is not None
            arrived = completions.arrive_sync(k)
            try:
                with locks.sync(k, timeout=timeout, ttl=ttl):
                    if completions.completed_since_sync(k, arrived):
                        return dropped(k, _COMPLETED)
                    result = fn(*args, **kwargs)
                    refuse_awaitable(fn, result, "stale_guard")
                    try:  # before the release: the next holder must see it
                        completions.complete_sync(k)
                    except KeylockError as exc:
                        _not_counted(k, exc)
                    return result
            finally:
                completions.leave(k)

        return guarded

    return decorate


_COMPLETED = "another call completed after this one arrived"


def _why(expected: SnapshotFunc | None) -> str:
    if expected is not None:
        return "the state read under the lock is not what the event expected"
    return "the snapshot read under the lock differs from the one read at entry"


def _same(key: str, before: object, after: object) -> bool:
    """Whether two snapshots are the same state: ``is``, both NaN, or ``==``."""
    if before is after:
        return True
    if (
        isinstance(before, float)
        and isinstance(after, float)
        and math.isnan(before)
        and math.isnan(after)
    ):
        return True  # a missing metric, read twice: no change
    try:
        return bool(before == after)
    except Exception as exc:
        raise TypeError(
            f"stale_guard for {key!r}: snapshot values of types {type(before).__name__} and "
            f"{type(after).__name__} cannot be compared with == ({type(exc).__name__}); "
            "return a comparable value, e.g. a tuple of the fields that matter"
        ) from None


def _refuse(function: SnapshotFunc, value: object) -> None:
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()
        raise TypeError(
            f"stale_guard on a sync function: {describe(function)} returned an awaitable; "
            "give a sync snapshot/expected, or make the handler async def"
        )


def _not_counted(key: str, exc: KeylockError) -> None:
    logger.warning(
        "keylock: stale_guard could not count a completed call for %r (%s): a call that "
        "arrived before it may run too",
        key,
        exc,
    )


async def _maybe_await(value: object) -> object:
    if inspect.isawaitable(value):
        return await value
    return value
