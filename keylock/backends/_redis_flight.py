"""SingleFlight across processes and hosts, through a RedisBackend.

One caller per key runs the work (it holds the lease ``flight:<key>``); the others, anywhere,
queue for that lease and read the result the leader stored in Redis under its token (JSON by
default, never pickle): they are woken by the leader's release, not by polling. If the leader
dies, its lease expires and the next caller in line takes over. Within one process callers
coalesce first, so one process sends one caller to Redis per key.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar, cast

from ..errors import LockTimeout
from ..registry import KeyedLock
from ..singleflight import SingleFlight
from .redis._wire import map_errors

if TYPE_CHECKING:
    from .redis import RedisBackend
    from .redis._clients import AsyncClient, SyncClient

P = ParamSpec("P")
R = TypeVar("R")

Serializer = tuple[Callable[[object], str | bytes], Callable[[str | bytes], object]]
JSON: Serializer = (json.dumps, json.loads)

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
        return self._backend.layout.flight_result(key, token)

    def _encode(self, outcome: object, error: BaseException | None) -> str | bytes:
        if error is not None:
            return self._dumps({"error": {"type": type(error).__name__, "message": str(error)}})
        return self._dumps({"ok": outcome})

    def _decode(self, raw: str | bytes) -> object:
        payload = cast("dict[str, object]", self._loads(raw))
        if "error" in payload:
            raise _rebuild(cast("dict[str, str]", payload["error"]))
        return payload["ok"]

    # Leader: takes the lease flight:<key>, runs the work, stores the outcome under its token,
    # then releases. Follower: notes the holder's token, queues for the lease (woken at the
    # leader's release, no polling) and reads the outcome stored under that token. No outcome
    # (the leader died and its lease expired; or the holder was a follower, so the work it
    # shared had finished before this caller came): the follower holds the lease, so it leads.
    # Outcomes are never passed on from follower to follower: that would serve a finished
    # result to callers for as long as new ones keep arriving.

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
                    payload = self._encode(None, exc)
                    await self._put(client, key, lease.token, payload)
                    raise
                payload = self._encode(outcome, None)
                await self._put(client, key, lease.token, payload)
                return outcome
            finally:
                await lease.release()

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
                    payload = self._encode(None, exc)
                    self._put_sync(client, key, lease.token, payload)
                    raise
                payload = self._encode(outcome, None)
                self._put_sync(client, key, lease.token, payload)
                return outcome
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

    def forget(self, key: str) -> None:
        self._local.forget(key)
