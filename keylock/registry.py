"""KeyedLock: the front door: one lock per key, for async code, threads and decorators."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar, overload

from ._callables import is_async_callable, key_misfit, refuse_awaitable
from ._holds import AsyncHold, SyncHold
from ._host import LeaseHost, LostCallback
from ._observed import _ObservedAsync, _ObservedSync
from ._validate import check_key, check_namespace, check_timeout, check_ttl
from .backends.base import Backend, KeyStatistics
from .backends.memory import MemoryBackend
from .lease import _PENDING, Lease

if TYPE_CHECKING:
    from .observe import Observer

__all__ = ["AsyncHold", "KeyFunc", "KeyedLock", "SyncHold", "not_a_backend"]


def not_a_backend(what: str, given: object) -> TypeError:
    """The error for *given* passed to *what*() as its backend: every backend named, and for
    a URL string the from_url call that makes a backend of it."""
    hint = ""
    if isinstance(given, str):
        scheme = given.split("://", 1)[0].lower() if "://" in given else ""
        if scheme.startswith("postgres"):
            hint = "; for a URL use PostgresBackend.from_url(url)"
        elif scheme.startswith(("redis", "unix")):
            hint = "; for a URL use RedisBackend.from_url(url)"
        else:
            hint = (
                "; for a URL use RedisBackend.from_url(url) or PostgresBackend.from_url(url), "
                "for a directory FileBackend(path)"
            )
    if isinstance(given, type):  # the class itself, a forgotten ()
        name = given.__name__
        made = {"MemoryBackend": "MemoryBackend()", "FileBackend": "FileBackend(directory)"}
        example = made.get(name, f"{name}.from_url(url)" if hasattr(given, "from_url") else "")
        return TypeError(
            f"{what}() takes a keylock backend instance, not the class {name}: make one"
            + (f", e.g. {what}({example})" if example else "")
        )
    return TypeError(
        f"{what}() takes a keylock backend (MemoryBackend, FileBackend, RedisBackend, "
        f"PostgresBackend), not {type(given).__name__}{hint}"
    )


P = ParamSpec("P")
R = TypeVar("R")
logger = logging.getLogger("keylock")

#: A decorator's key: a fixed string, or a function of the decorated call's arguments.
KeyFunc = str | Callable[..., str]  # type: ignore[explicit-any]  # any signature


def _keyword_only(fn: Callable[P, R]) -> Callable[P, R]:
    """*fn*, shown as it is to be called: the key, then keyword-only arguments.

    ``locks(key)`` and ``locks.sync(key)`` run on every block. CPython 3.11 specializes a call
    only to a function without keyword-only parameters (one with them costs about a tenth of
    an uncontended acquire+release more), so these take ``timeout`` and ``ttl`` as positional-
    or-keyword parameters behind a guard ``_by_keyword`` that refuses anything passed in its
    place: they behave, and are typed and shown, as keyword-only."""
    signature = inspect.signature(fn)
    fn.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            else p
            for name, p in signature.parameters.items()
            if name != "_by_keyword"
        ]
    )
    return fn


def _positional(call: str, key: object) -> TypeError:
    return TypeError(
        f"{call}({key!r}, ...) takes timeout= and ttl= by keyword only, "
        f"e.g. {call}({key!r}, timeout=5)"
    )


class KeyedLock:
    """Per-key mutual exclusion: at most one live lease per ``(namespace, key)``.

    ``KeyedLock()`` locks within this process (:class:`~keylock.backends.MemoryBackend`); pass a
    ``FileBackend`` or ``RedisBackend`` to exclude other processes or hosts. Waiting honours
    ``timeout`` (None: forever; 0: one try; else seconds, then :class:`~keylock.LockTimeout`).
    A caller cancelled while waiting holds nothing afterwards. Two namespaces never share a
    lock, whatever their keys (``("a:b", "c")`` and ``("a", "b:c")`` are distinct).
    """

    __slots__ = ("_async_hold", "_backend", "_host", "_prefix", "_sync_hold", "namespace")

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        namespace: str = "",
        on_lost: LostCallback | None = None,
        cancel_on_lost: bool = False,
        observer: Observer | None = None,
    ) -> None:
        if backend is not None and not isinstance(backend, Backend):
            raise not_a_backend("KeyedLock", backend)
        if on_lost is not None and not callable(on_lost):
            raise TypeError(f"on_lost must be a function of the lease, not {on_lost!r}")
        self.namespace = check_namespace(namespace)
        self._backend = backend = backend if backend is not None else MemoryBackend()
        self._host = host = LeaseHost(
            backend,
            namespace=namespace,
            observer=observer,
            on_lost=on_lost,
            cancel_on_lost=bool(cancel_on_lost),
        )
        self._prefix = host.prefix
        # Observed locks use subclasses of the holds; unobserved ones, and those whose
        # observer overrides no acquire/release/timeout hook, run no observer code there.
        observed = host.hooks is not None
        self._async_hold: type[AsyncHold] = _ObservedAsync if observed else AsyncHold
        self._sync_hold: type[SyncHold] = _ObservedSync if observed else SyncHold

    def __repr__(self) -> str:
        return f"KeyedLock({self._backend!r}, namespace={self.namespace!r})"

    @property
    def backend(self) -> Backend:
        """The backend holding this lock's state."""
        return self._backend

    @property
    def observer(self) -> Observer | None:
        """The observer this lock reports to, if any."""
        return self._host.observer

    # --------------------------------------------------------------------------- entry points

    @_keyword_only
    def __call__(
        self,
        key: str,
        _by_keyword: None = None,
        /,
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> AsyncHold:
        """``async with locks(key) as lease:`` holds *key* for the block (enter it once).

        For threads and sync code use ``with locks.sync(key)``: this object refuses ``with``.
        """
        if _by_keyword is not None:
            raise _positional("locks", key)
        new = self._async_hold  # (an attribute load: a method load of a slot is slower)
        hold = new()  # (no __init__: the hot path sets the fields itself)
        hold._host = self._host
        hold.key = key
        hold.ttl = ttl
        hold._timeout = timeout
        hold._state = _PENDING
        return hold

    @_keyword_only
    def sync(
        self,
        key: str,
        _by_keyword: None = None,
        /,
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> SyncHold:
        """``with locks.sync(key) as lease:`` holds *key* for the block, blocking the thread.

        In a coroutine use ``async with locks(key)``: this object refuses ``async with``.
        """
        if _by_keyword is not None:
            raise _positional("locks.sync", key)
        new = self._sync_hold
        hold = new()
        hold._host = self._host
        hold.key = key
        hold.ttl = ttl
        hold._timeout = timeout
        hold._state = _PENDING
        return hold

    async def acquire(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Wait for *key* and return its lease; release it with ``await lease.release()``.

        Raises LockTimeout when *timeout* passes first; a cancelled caller holds nothing.
        """
        return await self(key, timeout=timeout, ttl=ttl).__aenter__()

    def acquire_sync(
        self, key: str, /, *, timeout: float | None = None, ttl: float | None = None
    ) -> Lease:
        """Blocking twin of :meth:`acquire`; a thread cannot be cancelled, but ``lease.lost``
        and ``on_lost`` still report a loss."""
        return self.sync(key, timeout=timeout, ttl=ttl).__enter__()

    @overload
    def locked(
        self,
        fn: None = None,
        /,
        *,
        key: KeyFunc,
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]: ...

    @overload
    def locked(
        self,
        fn: Callable[P, R],
        /,
        *,
        key: KeyFunc,
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> Callable[P, R]: ...

    def locked(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        key: KeyFunc,
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate a sync or async function so each call holds the lock for *key*.

        *key* is a string or a function of the call's arguments returning one. Sync functions
        block their thread while waiting; async ones (anything whose call returns an awaitable)
        wait without blocking the loop and hold the lock until the awaitable finishes.
        """
        if not (isinstance(key, str) or callable(key)):
            raise TypeError(f"locked(key=...) takes a str or a function, not {key!r}")
        if isinstance(key, str):
            check_key(key)
        if timeout is not None:
            check_timeout(timeout, key if isinstance(key, str) else "<key>")
        if ttl is not None:
            check_ttl(ttl, key if isinstance(key, str) else "<key>")

        def decorate(func: Callable[P, R]) -> Callable[P, R]:
            return _decorate(self, func, key, timeout, ttl)

        return decorate if fn is None else decorate(fn)

    def statistics(self, key: str, /) -> KeyStatistics:
        """Who holds *key* and how many wait, as this process can see it."""
        key = check_key(key)
        found = self._backend.statistics(self._prefix + key)
        shown = f"{self.namespace}:{key}" if self.namespace else key  # as errors name it
        return KeyStatistics(
            shown, found.held, found.token, found.owner, found.waiting, found.holders
        )

    async def close(self) -> None:
        """Close the backend (connections, background renewal)."""
        await self._backend.close()

    def close_sync(self) -> None:
        """Blocking twin of :meth:`close`."""
        self._backend.close_sync()


def _decorate(
    locks: KeyedLock,
    func: Callable[P, R],
    key: KeyFunc,
    timeout: float | None,
    ttl: float | None,
) -> Callable[P, R]:
    if isinstance(key, str):

        def key_of(*args: object, **kwargs: object) -> str:
            return key

    else:
        key_fn = key

        def key_of(*args: object, **kwargs: object) -> str:
            try:
                return key_fn(*args, **kwargs)
            except TypeError as exc:  # (a try costs a call nothing until it raises)
                misfit = key_misfit(exc, key_fn, func, args, kwargs, "locked")
                if misfit is None:
                    raise
                raise misfit from None

    if is_async_callable(func):
        afunc: Callable[P, Awaitable[object]] = func  # type: ignore[assignment]

        @functools.wraps(func)
        async def alocked(*args: P.args, **kwargs: P.kwargs) -> object:
            async with locks(key_of(*args, **kwargs), timeout=timeout, ttl=ttl):
                return await afunc(*args, **kwargs)

        return alocked  # type: ignore[return-value]

    @functools.wraps(func)
    def slocked(*args: P.args, **kwargs: P.kwargs) -> R:
        with locks.sync(key_of(*args, **kwargs), timeout=timeout, ttl=ttl):
            result = func(*args, **kwargs)
            # an awaitable's body would run after the lock is released: refuse it here
            refuse_awaitable(func, result, "locked")
            return result

    return slocked
