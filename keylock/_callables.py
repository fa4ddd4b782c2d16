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

__all__ = ["describe", "is_async_callable", "key_misfit", "refuse_awaitable"]

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


def key_misfit(
    exc: TypeError,
    key: object,
    fn: object,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    what: str,
    role: str = "key",
) -> TypeError | None:
    """The TypeError to raise instead of *exc* when *exc* says that the key function *key*
    cannot take this call's arguments (those of the decorated *fn*); None when *exc* came from
    inside the key function, or is about something else (re-raise it as it is). *role* names
    the function's part in *what* ("key"; stale_guard's "snapshot" and "expected" too).

    Called only once the key function's call has raised: a wrapper's fast path pays nothing.
    The message names both functions, their parameters and the call's shape, never an
    argument's value.
    """
    traceback = exc.__traceback__
    if traceback is not None and traceback.tb_next is not None:
        return None  # raised from a frame of the key function's own: its body's error
    try:
        expects = inspect.signature(key)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # no signature to tell a misfit by (some builtins)
    try:
        expects.bind(*args, **kwargs)
    except TypeError as why:
        reason = str(why)
    else:
        return None  # the arguments fit: the TypeError is the key function's own
    passed = f"{len(args)} positional argument{'s' * (len(args) != 1)}"
    if kwargs:
        passed += f" and keyword{'s' * (len(kwargs) != 1)} {', '.join(kwargs)}"
    name = getattr(fn, "__name__", None) or describe(fn)
    try:
        params = f"{name}{_parameters(inspect.signature(fn))}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        params = name
    return TypeError(
        f"@{what}({role}=...) of {describe(fn)}: the {role} function {describe(key)}"
        f"{_parameters(expects)} "
        f"cannot take this call's arguments ({passed}: {reason}); it is called with the "
        f"arguments of every call of {params}, so give it matching parameters (the same "
        "names, in the same order; end with *args, **kwargs to accept the ones it does not use)"
    )


def _parameters(signature: inspect.Signature) -> str:
    """``(a, /, b=..., *args, c, **kwargs)``: the names and kinds, never a default's value
    (a default may be a secret) nor an annotation."""
    shown: list[str] = []
    starred = False
    kinds = inspect.Parameter
    parameters = list(signature.parameters.values())
    for i, parameter in enumerate(parameters):
        kind = parameter.kind
        if kind is kinds.VAR_POSITIONAL:
            shown.append(f"*{parameter.name}")
            starred = True
        elif kind is kinds.VAR_KEYWORD:
            shown.append(f"**{parameter.name}")
        else:
            if kind is kinds.KEYWORD_ONLY and not starred:
                shown.append("*")
                starred = True
            default = "" if parameter.default is parameter.empty else "=..."
            shown.append(f"{parameter.name}{default}")
        if kind is kinds.POSITIONAL_ONLY and (
            i + 1 == len(parameters) or parameters[i + 1].kind is not kinds.POSITIONAL_ONLY
        ):
            shown.append("/")
    return f"({', '.join(shown)})"
