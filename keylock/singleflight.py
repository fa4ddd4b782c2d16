"""SingleFlight: concurrent callers of one key share one execution and its outcome."""

from __future__ import annotations

import asyncio
import copy
import functools
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar, cast

from ._host import report
from ._validate import MAX_KEY_LENGTH, check_key

if TYPE_CHECKING:
    from .backends.base import Backend
    from .observe import Observer

__all__ = ["SingleFlight"]

P = ParamSpec("P")
R = TypeVar("R")

Serializer = tuple[Callable[[object], str | bytes], Callable[[str | bytes], object]]
_Slot = tuple[str, asyncio.AbstractEventLoop]
_WHAT = "single-flight key"  # (its errors must not call it a lock key)


class RemoteFlight(Protocol):
    """Runs one process's share of a key's work so that one caller across hosts runs it.

    Called by the one in-process leader of *key*; it either runs *fn* or returns (or raises)
    what the run elsewhere produced, decoded the same way for every caller.
    """

    #: The prefix of the lock a key's leader holds: a key may be at most MAX_KEY_LENGTH less
    #: its length, or the lock would refuse it.
    lock_prefix: str

    def run(
        self, key: str, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[object, object, R]: ...

    def run_sync(self, key: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R: ...


class _Flight:
    """One running execution on one event loop, and the callers waiting for it."""

    __slots__ = ("abandoned", "callers", "outcome", "seats", "task")

    def __init__(self, task: asyncio.Task[object], outcome: asyncio.Future[object]) -> None:
        self.task = task  # owned by the flight, never by a caller
        # The callers await this one future together, until one of them is cancelled: a
        # task's cancel cancels the future it awaits, waking the others, which then see that
        # they were not the one cancelled (Task.cancelling()) and each take a seat of their
        # own (outcome None from then on). So the common run costs no future per caller.
        self.outcome: asyncio.Future[object] | None = outcome
        self.seats: set[asyncio.Future[object]] = set()  # one per caller, after a cancel
        self.callers = 0  # callers still waiting; the task is cancelled when none is left
        # every caller left and the task was cancelled: it may still be cleaning up, so it
        # keeps its slot (a newcomer waits for its end) until it is done
        self.abandoned = False


class _Failed:
    """The outcome of a run that raised: each caller raises its own copy of *error*."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _SyncFlight:
    """One running execution in a leader thread; followers block on ``done``."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


def _own_copy(exc: BaseException) -> BaseException:
    """An instance-equivalent of *exc* for one caller, so callers never share a traceback.

    Same type, ``args``, message and attributes. ``copy.copy`` calls ``cls(*exc.args)``, which
    fails or changes the message when ``__init__`` takes other arguments than it stores in
    ``args`` (``E(code)`` storing ``f"code {code}"``): then the clone skips ``__init__``.
    """
    cls = type(exc)
    try:
        clone = copy.copy(exc)
    except Exception:
        clone = None
    if clone is None or type(clone) is not cls or not _same(clone, exc):
        try:
            clone = cls.__new__(cls, *exc.args)
            clone.args = exc.args
            clone.__dict__.update(vars(exc))
        except Exception:
            clone = None
        if clone is None or type(clone) is not cls or not _same(clone, exc):
            return exc  # cannot be rebuilt faithfully: share the original
    clone.__cause__ = exc.__cause__
    clone.__context__ = exc.__context__
    clone.__suppress_context__ = exc.__suppress_context__
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):  # a note one caller adds must not show up in the others'
        clone.__notes__ = list(notes)
    return clone.with_traceback(exc.__traceback__)


def _same(clone: BaseException, exc: BaseException) -> bool:
    try:
        return clone.args == exc.args and str(clone) == str(exc)
    except Exception:
        return False


class SingleFlight:
    """Concurrent ``do(key, fn)`` callers share one execution and its result or exception.

    One run per key at a time: the work runs in a task the flight owns; a caller's
    cancellation never cancels it while other callers still wait; it is cancelled only when
    every caller is gone. A caller arriving while such a cancelled run still cleans up (a
    ``finally: await ...``) waits for that run to end, then starts a fresh one (or joins the
    fresh one another newcomer started): it never joins a run that is being cancelled, and
    never overlaps it. Nothing is cached: a call arriving after the work finished starts a new
    one. Async callers coalesce per event loop; ``do_sync`` callers coalesce across threads.
    Every method is safe to call from any thread.

    ``SingleFlight(RedisBackend(...))`` coalesces across processes and hosts instead: one
    caller anywhere runs the work, the others receive its result through Redis (JSON unless a
    ``serializer=(dumps, loads)`` is given; never pickle by default), and if the leader dies
    another caller takes over once its lease expires. Every caller, the leader's included,
    gets the result as the serializer decodes it (a tuple comes back as a list with JSON); a
    result the serializer cannot encode is a ``TypeError`` for every caller of that run.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        namespace: str = "",
        observer: Observer | None = None,
        serializer: Serializer | None = None,
    ) -> None:
        from .backends.memory import MemoryBackend

        self._remote: RemoteFlight | None = None
        self._longest = MAX_KEY_LENGTH  # a key's limit: less a remote leader's lock prefix
        self._why = ""  # (said when a key goes over a limit that is not MAX_KEY_LENGTH)
        if backend is not None and not isinstance(backend, MemoryBackend):
            self._remote = remote = _remote_for(backend, namespace, serializer)
            self._longest -= len(remote.lock_prefix)
            self._why = (
                f" (its leader holds the lock {remote.lock_prefix + '<key>'!r}, and a lock key "
                f"is at most {MAX_KEY_LENGTH} characters)"
            )
        elif serializer is not None:
            raise ValueError(
                "SingleFlight(serializer=...) only applies to flights shared through a backend "
                "(results pass between processes); pass backend=, or drop serializer="
            )
        self._flights: dict[_Slot, _Flight] = {}  # read anywhere; changed under _mutex
        self._sync_flights: dict[str, _SyncFlight] = {}  # guarded by _mutex
        self._mutex = threading.Lock()
        self._observer = observer  # told of every caller that joins a run in flight

    def _coalesced(self, key: str) -> None:
        observer = self._observer
        if observer is not None:  # (an observer that raises is logged, never the caller's)
            report("Observer.coalesced", lambda: observer.coalesced(observer.prefix_of(key)))

    def __len__(self) -> int:
        """How many executions are running now (a cancelled one until its cleanup ends)."""
        return len(self._flights) + len(self._sync_flights)

    async def do(
        self, key: str, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Run ``await fn(*args, **kwargs)`` once for all concurrent callers of *key*.

        Cancelling this caller leaves the shared work running for the others; the work is
        cancelled once no caller is left. Each caller gets its own copy of an exception.
        """
        loop = _running_loop()
        # (a plain str that finds a flight is a valid key: it was checked when that flight
        # started; anything else, a str subclass included, is checked in _board)
        flight = self._flights.get((key, loop)) if type(key) is str else None
        if flight is None or flight.abandoned:
            flight = await self._board(key, loop, fn, *args, **kwargs)
        elif self._observer is not None:
            self._coalesced(key)
        flight.callers += 1
        task = _current_task(loop)
        asked = 0 if task is None else task.cancelling()  # this caller's, before it waits
        waiting = flight.outcome
        while True:
            if waiting is None:  # a caller left: each waits on a future of its own
                waiting = loop.create_future()
                flight.seats.add(waiting)
            try:
                outcome = await waiting
                break
            except asyncio.CancelledError:
                if task is None or task.cancelling() > asked:  # this caller was cancelled
                    self._leave(flight, waiting)
                    raise
                if flight.task.done():  # the work ended: cancelled, or settled meanwhile
                    if flight.task.cancelled():
                        raise
                    outcome = _outcome(flight.task)
                    break
                flight.outcome = waiting = None  # another caller left: wait anew
        if outcome.__class__ is _Failed:
            raise _own_copy(outcome.error)
        return outcome  # type: ignore[return-value]

    async def _board(
        self,
        key: str,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[P, Awaitable[R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> _Flight:
        """The flight of *key* to join, started by this caller if none runs. A run being
        cancelled (every caller left) still cleans up: one run at a time, so wait for it."""
        key = check_key(key, _WHAT, self._longest, self._why)
        slot = (key, loop)
        flight = self._flights.get(slot)
        while flight is None or flight.abandoned:
            if flight is None:
                if self._remote is None:
                    work = _call(fn, *args, **kwargs)
                else:
                    work = self._remote.run(key, fn, *args, **kwargs)
                return self._start(slot, loop.create_task(work), loop.create_future())
            await asyncio.wait((flight.task,))
            flight = self._flights.get(slot)
        if self._observer is not None:
            self._coalesced(key)
        return flight

    @staticmethod
    def _leave(flight: _Flight, waiting: asyncio.Future[object]) -> None:
        """A cancelled caller leaves; the last one to leave a running flight cancels it."""
        flight.callers -= 1
        flight.seats.discard(waiting)
        if waiting is flight.outcome:  # (cancelled with it: the others must take seats)
            flight.outcome = None
        if not flight.callers and not flight.task.done():
            # the last caller is gone: nobody wants the result any more
            flight.abandoned = True
            flight.task.cancel()

    def _start(
        self, slot: _Slot, task: asyncio.Task[object], outcome: asyncio.Future[object]
    ) -> _Flight:
        flight = _Flight(task, outcome)
        with self._mutex:
            self._flights[slot] = flight
        task.add_done_callback(functools.partial(self._settle, slot, flight))
        return flight

    def _settle(self, slot: _Slot, flight: _Flight, task: asyncio.Task[object]) -> None:
        """Hand the outcome to every caller still waiting (each raises its own copy of an
        error); cancel them if the work was cancelled (from outside, or by every caller)."""
        with self._mutex:
            if self._flights.get(slot) is flight:
                del self._flights[slot]
        waiting = list(flight.seats)
        if flight.outcome is not None:
            waiting.append(flight.outcome)
        cancelled = task.cancelled()
        outcome = None if cancelled else _outcome(task)
        for future in waiting:
            if future.done():  # a caller cancelled a moment ago, not gone yet
                continue
            if cancelled:
                future.cancel()
            else:
                future.set_result(outcome)

    def do_sync(self, key: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` once for all concurrent callers of *key* in any thread.

        The first caller runs it in its own thread; the others block until it finishes.
        """
        key = check_key(key, _WHAT, self._longest, self._why)
        with self._mutex:
            flight = self._sync_flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._sync_flights[key] = _SyncFlight()
        if not leader:
            if self._observer is not None:
                self._coalesced(key)
            flight.done.wait()
            if flight.error is None:
                return cast("R", flight.result)
            raise _own_copy(flight.error)
        try:
            if self._remote is None:
                result = fn(*args, **kwargs)
            else:
                result = self._remote.run_sync(key, fn, *args, **kwargs)
            flight.result = result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._mutex:
                if self._sync_flights.get(key) is flight:
                    del self._sync_flights[key]
            flight.done.set()
        return result

    def forget(self, key: str) -> None:
        """Let the next caller of *key* start a fresh execution; current callers keep theirs.

        Safe from any thread while loops run flights. A run being cancelled is left alone: a
        newcomer already waits for its end and then starts fresh.
        """
        key = check_key(key, _WHAT, self._longest, self._why)
        with self._mutex:
            for slot in [s for s, f in self._flights.items() if s[0] == key and not f.abandoned]:
                del self._flights[slot]
            self._sync_flights.pop(key, None)


def _remote_for(backend: Backend, namespace: str, serializer: Serializer | None) -> RemoteFlight:
    """The cross-host flight for *backend*, or TypeError when it cannot coalesce across hosts.

    A RedisBackend exists only once its module is loaded, so an unloaded module means "not
    Redis" without importing redis (``import keylock`` stays free of it).
    """
    if "keylock.backends.redis" in sys.modules:
        from .backends.redis import RedisBackend

        if isinstance(backend, RedisBackend):
            from ._remote_flight import RedisFlight

            return RedisFlight(backend, namespace, serializer)
    raise TypeError(
        f"SingleFlight cannot coalesce through {type(backend).__name__}: "
        "use no backend (in-process) or a RedisBackend (across hosts)"
    )


async def _call(fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
    return await fn(*args, **kwargs)


def _outcome(task: asyncio.Task[object]) -> object:
    """What a finished (not cancelled) run hands its callers: its result, or _Failed."""
    error = task.exception()
    return task.result() if error is None else _Failed(error)


_running_loop = asyncio.get_running_loop
_current_task = asyncio.current_task
