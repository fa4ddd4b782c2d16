"""SingleFlight: concurrent callers of one key share one execution and its outcome."""

from __future__ import annotations

import asyncio
import copy
import threading
from typing import TYPE_CHECKING, ParamSpec, TypeVar, cast

from ._validate import check_key

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .backends.base import Backend
    from .observe import Observer

__all__ = ["SingleFlight"]

P = ParamSpec("P")
R = TypeVar("R")


class _Flight:
    """One running execution on one event loop, and the callers waiting for it."""

    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task  # owned by the flight, never by a caller
        # one future per caller still waiting; the task is cancelled when this empties
        self.waiters: set[asyncio.Future[object]] = set()


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

    The work runs in a task the flight owns: a caller's cancellation never cancels it while
    other callers still wait; it is cancelled only when every caller is gone, and a caller
    arriving after that starts a fresh run. Nothing is cached: a call arriving after the work
    finished starts a new one. Async callers coalesce per event loop; ``do_sync`` callers
    coalesce across threads.

    ``SingleFlight(RedisBackend(...))`` coalesces across processes and hosts instead: one
    caller anywhere runs the work, the others receive its result through Redis (JSON unless a
    ``serializer=(dumps, loads)`` is given; never pickle by default), and if the leader dies
    another caller takes over once its lease expires.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        namespace: str = "",
        observer: Observer | None = None,
        serializer: tuple[Callable[[object], str | bytes], Callable[[str | bytes], object]]
        | None = None,
    ) -> None:
        from .backends.memory import MemoryBackend

        self._remote: _RemoteFlights | None = None
        if backend is not None and not isinstance(backend, MemoryBackend):
            make = getattr(backend, "_single_flight", None)
            if make is None:
                raise TypeError(
                    f"SingleFlight cannot coalesce through {type(backend).__name__}: "
                    "use no backend (in-process) or a RedisBackend (across hosts)"
                )
            if serializer is not None:
                self._remote = cast("_RemoteFlights", make(namespace, serializer))
            else:
                self._remote = cast("_RemoteFlights", make(namespace))
        self._flights: dict[tuple[str, asyncio.AbstractEventLoop], _Flight] = {}
        self._sync_flights: dict[str, _SyncFlight] = {}  # guarded by _mutex
        self._mutex = threading.Lock()
        self._observer = observer  # told of every caller that joins a run in flight

    def __len__(self) -> int:
        """How many executions are running now."""
        return len(self._flights) + len(self._sync_flights)

    async def do(
        self, key: str, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Run ``await fn(*args, **kwargs)`` once for all concurrent callers of *key*.

        Cancelling this caller leaves the shared work running for the others; the work is
        cancelled once no caller is left. Each caller gets its own copy of an exception.
        """
        key = check_key(key)
        if self._remote is not None:
            return await self._remote.do(key, fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        slot = (key, loop)
        flight = self._flights.get(slot)
        if flight is None:
            work: asyncio.Task[object] = loop.create_task(_call(fn, *args, **kwargs))
            flight = self._flights[slot] = _Flight(work)
            work.add_done_callback(lambda task: self._settle(slot, flight, task))
        elif self._observer is not None:
            self._observer.coalesced(self._observer.prefix_of(key))
        # each caller waits on a future of its own: cancelling it leaves the work alone
        waiter: asyncio.Future[object] = loop.create_future()
        flight.waiters.add(waiter)
        try:
            return cast("R", await waiter)
        except asyncio.CancelledError:
            if waiter.cancelled():  # this caller was cancelled (not the work)
                flight.waiters.discard(waiter)
                if not flight.waiters and not flight.task.done():
                    # the last caller is gone: nobody wants the result any more
                    flight.task.cancel()
                    self._finish(slot, flight)
            raise

    def _settle(
        self,
        slot: tuple[str, asyncio.AbstractEventLoop],
        flight: _Flight,
        task: asyncio.Task[object],
    ) -> None:
        """Hand the outcome to every caller still waiting (each its own copy of an error)."""
        self._finish(slot, flight)
        waiters = [w for w in flight.waiters if not w.done()]
        if task.cancelled():
            for waiter in waiters:
                waiter.cancel()
            return
        error = task.exception()
        if error is not None:
            for waiter in waiters:
                waiter.set_exception(_own_copy(error))
            return
        result = task.result()
        for waiter in waiters:
            waiter.set_result(result)

    def _finish(self, slot: tuple[str, asyncio.AbstractEventLoop], flight: _Flight) -> None:
        if self._flights.get(slot) is flight:
            del self._flights[slot]

    def do_sync(self, key: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` once for all concurrent callers of *key* in any thread.

        The first caller runs it in its own thread; the others block until it finishes.
        """
        key = check_key(key)
        if self._remote is not None:
            return self._remote.do_sync(key, fn, *args, **kwargs)
        with self._mutex:
            flight = self._sync_flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._sync_flights[key] = _SyncFlight()
        if not leader:
            if self._observer is not None:
                self._observer.coalesced(self._observer.prefix_of(key))
            flight.done.wait()
            if flight.error is None:
                return cast("R", flight.result)
            raise _own_copy(flight.error)
        try:
            flight.result = result = fn(*args, **kwargs)
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
        """Let the next caller of *key* start a fresh execution; current callers keep theirs."""
        key = check_key(key)
        if self._remote is not None:
            self._remote.forget(key)
        for slot in [slot for slot in self._flights if slot[0] == key]:
            self._flights.pop(slot, None)
        with self._mutex:
            self._sync_flights.pop(key, None)


async def _call(fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
    return await fn(*args, **kwargs)


class _RemoteFlights:
    """What a cross-process backend provides to SingleFlight (see RedisBackend)."""

    async def do(
        self, key: str, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        raise NotImplementedError

    def do_sync(self, key: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        raise NotImplementedError

    def forget(self, key: str) -> None:
        raise NotImplementedError
