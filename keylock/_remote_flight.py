"""SingleFlight across processes and hosts, through a RedisBackend.

One caller per key runs the work (it holds the lease ``flight:<key>``); the others, anywhere,
queue for that lease and read the result the leader stored in Redis under its token (JSON by
default, never pickle): they are woken by the leader's release, not by polling. If the leader
dies, its lease expires and the next caller in line takes over. SingleFlight coalesces the
callers of one process first and hands only its one leader per key to :class:`RedisFlight`.
"""

from __future__ import annotations

import builtins
import json
from typing import TYPE_CHECKING, ParamSpec, TypeVar, cast

from .backends.redis._wire import map_errors
from .errors import LockTimeout
from .registry import KeyedLock

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .backends.redis import RedisBackend
    from .backends.redis._clients import AsyncClient, SyncClient
    from .singleflight import Serializer

__all__ = ["RedisFlight"]

P = ParamSpec("P")
R = TypeVar("R")

_TTL = 60_000  # ms a result stays readable for late followers


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


class RedisFlight:
    """The cross-host part of ``SingleFlight(RedisBackend(...))`` (a ``RemoteFlight``).

    Every caller gets the outcome as the serializer decodes it: the leader decodes the
    payload it stores, so it sees what its followers see. A result the serializer cannot
    round-trip is stored as a ``TypeError`` naming the key, which every caller of that run
    gets, once; the work is not run again for each of them.
    """

    lock_prefix = "flight:"  # the leader of key k holds the lock "flight:k"

    def __init__(
        self, backend: RedisBackend, namespace: str, serializer: Serializer | None = None
    ) -> None:
        self._backend = backend
        self._locks = KeyedLock(backend, namespace=namespace or "flight")
        dumps, loads = serializer or (json.dumps, json.loads)
        self._dumps: Callable[[object], str | bytes] = dumps
        self._loads: Callable[[str | bytes], object] = loads

    def _result_key(self, key: str, token: int) -> str:
        return self._backend.layout.flight_result(key, token)

    def _decode(self, raw: str | bytes) -> object:
        # bytes, as Redis returns them, for every caller (a decode_responses client gives str)
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogatepass")
        payload = cast("dict[str, object]", self._loads(raw))
        if "error" in payload:
            raise _rebuild(cast("dict[str, str]", payload["error"]))
        return payload["ok"]

    def _failed(self, error: BaseException) -> str | bytes:
        return self._dumps({"error": {"type": type(error).__name__, "message": str(error)}})

    def _succeeded(self, key: str, outcome: object) -> tuple[str | bytes, object, TypeError | None]:
        """The payload to store for *outcome* and what every caller gets: its decoding, or,
        when the serializer cannot round-trip it, a payload and TypeError saying so."""
        try:
            payload = self._dumps({"ok": outcome})
            return payload, self._decode(payload), None
        except Exception as exc:
            error = TypeError(
                f"single-flight result for {key!r} ({type(outcome).__name__}) cannot go "
                f"through the serializer ({type(exc).__name__}: {exc}): return a value it "
                "encodes (JSON by default: dict, list, str, int, float, bool, None) or pass "
                "SingleFlight(..., serializer=(dumps, loads))"
            )
            error.__cause__ = exc
            return self._failed(error), None, error

    # Leader: takes the lease flight:<key>, runs the work, stores the outcome under its token,
    # then releases. Follower: notes the holder's token, queues for the lease (woken at the
    # leader's release, no polling) and reads the outcome stored under that token. No outcome
    # (the leader died and its lease expired; or the holder was a follower, so the work it
    # shared had finished before this caller came): the follower holds the lease, so it leads.
    # Outcomes are never passed on from follower to follower: that would serve a finished
    # result to callers for as long as new ones keep arriving.

    async def run(
        self, key: str, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Run *fn* as the leader of *key* across hosts, or return the leader's outcome."""
        client = self._backend._async()
        lock_key = self.lock_prefix + key
        while True:
            try:
                lease = await self._locks.acquire(lock_key, timeout=0)
            except LockTimeout:
                leader = await self._backend._holder_async(self._full(lock_key))
                if leader is None:  # released in between: try again
                    continue
                lease = await self._locks.acquire(lock_key)
                try:
                    raw = await self._get(client, key, leader)
                except BaseException:
                    await lease.release()
                    raise
                if raw is not None:
                    await lease.release()
                    return cast("R", self._decode(raw))
            # the leader: run it, store the outcome, then give up the lease
            try:
                try:
                    outcome = await fn(*args, **kwargs)
                except Exception as exc:
                    await self._put(client, key, lease.token, self._failed(exc))
                    raise
                payload, value, error = self._succeeded(key, outcome)
                await self._put(client, key, lease.token, payload)
                if error is not None:
                    raise error
                return cast("R", value)
            finally:
                await lease.release()

    def run_sync(self, key: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run *fn* as the leader of *key* across hosts, or return the leader's outcome."""
        client = self._backend._sync()
        lock_key = self.lock_prefix + key
        while True:
            try:
                lease = self._locks.acquire_sync(lock_key, timeout=0)
            except LockTimeout:
                leader = self._locks.statistics(lock_key).token
                if leader is None:
                    continue
                lease = self._locks.acquire_sync(lock_key)
                try:
                    raw = self._get_sync(client, key, leader)
                except BaseException:
                    lease.release_sync()
                    raise
                if raw is not None:
                    lease.release_sync()
                    return cast("R", self._decode(raw))
            try:
                try:
                    outcome = fn(*args, **kwargs)
                except Exception as exc:
                    self._put_sync(client, key, lease.token, self._failed(exc))
                    raise
                payload, value, error = self._succeeded(key, outcome)
                self._put_sync(client, key, lease.token, payload)
                if error is not None:
                    raise error
                return cast("R", value)
            finally:
                lease.release_sync()

    def _full(self, lock_key: str) -> str:
        return self._locks._prefix + lock_key

    # Outcomes in Redis; errors become BackendUnavailable here, once.

    async def _get(self, client: AsyncClient, key: str, token: int) -> bytes | None:
        with map_errors(key, self._backend._where):
            return cast("bytes | None", await client.get(self._result_key(key, token)))

    async def _put(self, client: AsyncClient, key: str, token: int, payload: str | bytes) -> None:
        with map_errors(key, self._backend._where):
            await client.set(self._result_key(key, token), payload, px=_TTL)

    def _get_sync(self, client: SyncClient, key: str, token: int) -> bytes | None:
        with map_errors(key, self._backend._where):
            return cast("bytes | None", client.get(self._result_key(key, token)))

    def _put_sync(self, client: SyncClient, key: str, token: int, payload: str | bytes) -> None:
        with map_errors(key, self._backend._where):
            client.set(self._result_key(key, token), payload, px=_TTL)
