"""Telling async callables from sync ones, for the decorators that wrap them under a lock.

A decorator must pick its wrapper before the first call: an async wrapper awaits the body
under the lock, a sync one runs it under the lock. Picking the sync wrapper for an async
callable releases the lock around the creation of a coroutine, and the body then runs with no
lock at all; so what this module cannot classify, the sync wrapper checks at each call
(:func:`refuse_awaitable`).
"""

from __future__ import annotations

import functools
import inspect
import types

__all__ = ["describe", "is_async_callable", "refuse_awaitable"]

_MAX_DEPTH = 64  # partials, wrappers and __call__ hops followed before giving up (cycles)


def is_async_callable(fn: object) -> bool:
    """True if calling *fn* returns a coroutine by construction.

    Seen through: ``functools.partial`` (any depth), bound methods, objects whose class has an
    ``async def __call__``, functions marked with ``inspect.markcoroutinefunction``, and chains
    of plain functions made with ``functools.wraps`` whose innermost function is ``async def``
    (a plain ``def wrapper(*a, **kw): return fn(*a, **kw)`` decorator returns fn's coroutine).
    A wraps-chain through an *object* (e.g. asgiref's ``async_to_sync``) stops there: such an
    object runs the coroutine itself. A class is never async (calling it builds an instance).
    """
    for _ in range(_MAX_DEPTH):
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        if inspect.iscoroutinefunction(fn):
            return True
        if isinstance(fn, type):
            return False
        if isinstance(fn, types.FunctionType | types.MethodType):
            wrapped = getattr(fn, "__wrapped__", None)
            if wrapped is None:
                return False
            fn = wrapped
            continue
        call = getattr(fn, "__call__", None)  # noqa: B004 - the bound method, not callable()
        if not isinstance(call, types.MethodType):
            return False  # a builtin, or not callable at all
        fn = call
    return False


def describe(fn: object) -> str:
    """A short name for *fn* in messages: its qualified name, else its type's."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    if not isinstance(name, str):
        name = f"{type(fn).__qualname__} object"
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{name}"


def refuse_awaitable(fn: object, result: object, what: str) -> None:
    """Raise TypeError if *result* (of calling *fn* in a sync wrapper) is awaitable.

    The body has not run yet when *result* is a coroutine: it is closed (no "never awaited"
    warning) and never runs outside the lock. Other awaitables (a Task, a Future) are
    cancelled where possible. *what* names the wrapper (``"locked"``, ``"stale_guard"``).
    """
    if not inspect.isawaitable(result):
        return
    close = getattr(result, "close", None)
    cancel = getattr(result, "cancel", None)
    if inspect.iscoroutine(result) and callable(close):
        close()
    elif callable(cancel):
        cancel()
    raise TypeError(
        f"@{what}: {describe(fn)} returned an awaitable, but it does not look async, so it got "
        f"the sync wrapper and its body would run outside the lock; make it `async def` (or "
        f"mark it with inspect.markcoroutinefunction) so that {what} awaits it under the lock"
    )
