"""SingleFlight across processes and hosts, through a RedisBackend.

One caller per key runs the work (it holds the lease ``flight:<key>``); the others, anywhere,
wait for the result the leader stores in Redis under that lease's token (JSON by default, never
pickle). If the leader dies, its lease expires and the next caller takes over. Within one
process callers coalesce first, so one process sends one caller to Redis per key.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar, cast

from ..errors import LockTimeout
from ..registry import KeyedLock
from ..singleflight import SingleFlight

if TYPE_CHECKING:
    from .redis import RedisBackend

P = ParamSpec("P")
R = TypeVar("R")

Serializer = tuple[Callable[[object], str | bytes], Callable[[str | bytes], object]]
JSON: Serializer = (json.dumps, json.loads)

_TTL = 60_000  # ms a result stays readable for late followers
_FIRST_POLL = 0.002
_MAX_POLL = 0.1


def _rebuild(payload: dict[str, str]) -> BaseException:
    """The leader's exception for a follower: the same builtin type, else a RuntimeError."""
    name, message = payload["type"], payload["message"]
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:
            pass
    return RuntimeError(f"{name}: {message} (raised by the single-flight leader)")


class RemoteFlights:
    """What ``SingleFlight(RedisBackend(...))`` delegates to."""

    def __init__(
        self, backend: RedisBackend, namespace: str, serializer: Serializer = JSON
    ) -> None:
        self._backend = backend
        self._locks = KeyedLock(backend, namespace=namespace or "flight")
        self._local = SingleFlight()
        self._dumps, self._loads = serializer

    def _result_key(self, key: str, token: int) -> str:
        return f"{self._backend.prefix}:{{flight:{key}}}:result:{token}"

    def _encode(self, outcome: object, error: BaseException | None) -> str | bytes:
        if error is not None:
            return self._dumps({"error": {"type": type(error).__name__, "message": str(error)}})
        return self._dumps({"ok": outcome})

    def _decode(self, raw: str | bytes) -> object:
        payload = cast("dict[str, object]", self._loads(raw))
        if "error" in payload:
            raise _rebuild(cast("dict[str, str]", payload["error"]))
        return payload["ok"]

    # ------------------------------------------------------------------------- async

    async def do(
        self, key: str, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        async def remote() -> R:
            return await self._remote(key, fn, *args, **kwargs)

        return await self._local.do(key, remote)

    async def _remote(
        self, key: str, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        client = self._backend._async()
        lock_key = f"flight:{key}"
        while True:
            try:
                lease = await self._locks.acquire(lock_key, timeout=0)
            except LockTimeout:
                lease = None
            if lease is not None:  # the leader: run it, publish the outcome, give up the lease
                # the outcome is stored before the lease goes, so no follower sees neither
                try:
                    try:
                        outcome = await fn(*args, **kwargs)
                    except Exception as exc:
                        payload = self._encode(None, exc)
                        await client.set(self._result_key(key, lease.token), payload, px=_TTL)
                        raise
                    payload = self._encode(outcome, None)
                    await client.set(self._result_key(key, lease.token), payload, px=_TTL)
                    return outcome
                finally:
                    await lease.release()
            # a follower: wait for the running leader's result, or for its lease to go
            stats = self._locks.statistics(lock_key)
            if not stats.held or stats.token is None:
                continue
            pause = _FIRST_POLL
            while True:
                raw = await client.get(self._result_key(key, stats.token))
                if raw is not None:
                    return cast("R", self._decode(raw))
                now = self._locks.statistics(lock_key)
                if now.token != stats.token:  # leader finished or died: result or retake
                    raw = await client.get(self._result_key(key, stats.token))
                    if raw is not None:
                        return cast("R", self._decode(raw))
                    break
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_POLL)

    # -------------------------------------------------------------------------- sync

    def do_sync(self, key: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._local.do_sync(key, lambda: self._remote_sync(key, fn, *args, **kwargs))

    def _remote_sync(self, key: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        client = self._backend._sync()
        lock_key = f"flight:{key}"
        while True:
            try:
                lease = self._locks.acquire_sync(lock_key, timeout=0)
            except LockTimeout:
                lease = None
            if lease is not None:
                try:
                    try:
                        outcome = fn(*args, **kwargs)
                    except Exception as exc:
                        payload = self._encode(None, exc)
                        client.set(self._result_key(key, lease.token), payload, px=_TTL)
                        raise
                    payload = self._encode(outcome, None)
                    client.set(self._result_key(key, lease.token), payload, px=_TTL)
                    return outcome
                finally:
                    lease.release_sync()
            stats = self._locks.statistics(lock_key)
            if not stats.held or stats.token is None:
                continue
            pause = _FIRST_POLL
            while True:
                raw = client.get(self._result_key(key, stats.token))
                if raw is not None:
                    return cast("R", self._decode(cast("bytes", raw)))
                now = self._locks.statistics(lock_key)
                if now.token != stats.token:
                    raw = client.get(self._result_key(key, stats.token))
                    if raw is not None:
                        return cast("R", self._decode(cast("bytes", raw)))
                    break
                time.sleep(pause)
                pause = min(pause * 2, _MAX_POLL)

    def forget(self, key: str) -> None:
        self._local.forget(key)
