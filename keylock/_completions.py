"""Where ``stale_guard`` counts completed calls: in this process, or beside a shared lock.

Without a snapshot, a guarded call is dropped when another call of the same guarded function
for the same key completed successfully after it arrived. The guard reads the count of
completions of (function, key) when a call arrives, and again under the key's lock; a higher
count means a completion came in between. It counts a completion while still holding the
lock, so the next holder, in whatever process, sees it.

- A lock only this process sees (MemoryBackend, or any backend this module does not know):
  a count in memory, per guarded function, kept while calls for the key are in flight.
- FileBackend: a file beside the lock files, ``<readable>.<digest>.done`` in the lock
  directory (digest: SHA-256 of the function's qualified name and the lock key, 128 bits),
  holding the count in decimal. Written only under the key's lock, by an atomic rename, so a
  reader without the lock sees the old count or the new one. ``prune()`` leaves these files.
- RedisBackend: ``INCR`` on ``<prefix>:{<lock's hash tag>}:done:<digest>`` (one Cluster slot
  with the lock), which expires after :data:`REDIS_IDLE_EXPIRY` seconds without a completion.

A count that is lost (the file removed, the Redis key expired) restarts at zero; as every
completion counted after that happened after the loss, a call is then never dropped wrongly:
at worst one call that should have been dropped runs. A backend may bring its own store with a
``_completions(scope, lock_key)`` method returning a :class:`Completions`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, Protocol

from .errors import BackendUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from .backends.redis import RedisBackend
    from .registry import KeyedLock

__all__ = ["REDIS_IDLE_EXPIRY", "Completions", "for_lock"]

logger = logging.getLogger("keylock")

#: Seconds a Redis completion count outlives its last completion.
REDIS_IDLE_EXPIRY = 86_400


class Completions(Protocol):
    """A count of completed calls per key. ``arrive`` reads it (and may register the caller);
    ``completed_since`` says whether it grew since; ``complete`` adds one and is called only
    under the key's lock; ``leave`` ends what ``arrive`` began (always called after it)."""

    def arrive_sync(self, key: str) -> int: ...
    def completed_since_sync(self, key: str, arrived: int) -> bool: ...
    def complete_sync(self, key: str) -> None: ...
    async def arrive(self, key: str) -> int: ...
    async def completed_since(self, key: str, arrived: int) -> bool: ...
    async def complete(self, key: str) -> None: ...
    def leave(self, key: str) -> None: ...


class _Inline:
    """Async twins that run the sync operation inline (memory, or a small local file)."""

    def arrive_sync(self, key: str) -> int:
        raise NotImplementedError

    def completed_since_sync(self, key: str, arrived: int) -> bool:
        raise NotImplementedError

    def complete_sync(self, key: str) -> None:
        raise NotImplementedError

    async def arrive(self, key: str) -> int:
        return self.arrive_sync(key)

    async def completed_since(self, key: str, arrived: int) -> bool:
        return self.completed_since_sync(key, arrived)

    async def complete(self, key: str) -> None:
        self.complete_sync(key)

    def leave(self, key: str) -> None:
        return None


class LocalCompletions(_Inline):
    """In memory: per key, [calls in flight, completions]; forgotten when none is in flight
    (a call arriving later reads a fresh zero, and every completion it can see follows it)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._keys: dict[str, list[int]] = {}  # key -> [in flight, completions]; _mutex

    def arrive_sync(self, key: str) -> int:
        with self._mutex:
            state = self._keys.get(key)
            if state is None:
                state = self._keys[key] = [0, 0]
            state[0] += 1
            return state[1]

    def completed_since_sync(self, key: str, arrived: int) -> bool:
        with self._mutex:
            return self._keys[key][1] > arrived

    def complete_sync(self, key: str) -> None:
        with self._mutex:
            self._keys[key][1] += 1

    def leave(self, key: str) -> None:
        with self._mutex:
            state = self._keys[key]
            state[0] -= 1
            if state[0] == 0:
                del self._keys[key]


def _digest(scope: str, lock_key: str) -> str:
    data = f"{len(scope)}:{scope}{lock_key}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:32]


class FileCompletions(_Inline):
    """A count file per (function, key) in a FileBackend's lock directory."""

    def __init__(self, directory: str, scope: str, lock_key: Callable[[str], str]) -> None:
        self._directory = directory
        self._scope = scope
        self._lock_key = lock_key

    def _name(self, key: str) -> str:
        full = self._lock_key(key)
        readable = re.sub(r"[^A-Za-z0-9._-]", "_", full)[:64].lstrip(".") or "key"
        return f"{readable}.{_digest(self._scope, full)}.done"

    def _read(self, key: str) -> int:
        path = os.path.join(self._directory, self._name(key))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise self._error(key, path, exc) from exc
        try:
            text = os.read(fd, 32)
        finally:
            os.close(fd)
        return int(text) if text.isdigit() else 0  # not a count: as if lost

    def arrive_sync(self, key: str) -> int:
        return self._read(key)

    def completed_since_sync(self, key: str, arrived: int) -> bool:
        return self._read(key) > arrived

    def complete_sync(self, key: str) -> None:
        count = self._read(key) + 1
        path = os.path.join(self._directory, self._name(key))
        try:
            fd, temporary = tempfile.mkstemp(prefix=".done.", dir=self._directory)
        except OSError as exc:
            raise self._error(key, path, exc) from exc
        try:
            try:
                os.write(fd, str(count).encode())
            finally:
                os.close(fd)
            os.replace(temporary, path)  # replaces a planted symlink itself, never its target
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise self._error(key, path, exc) from exc

    @staticmethod
    def _error(key: str, path: str, exc: OSError) -> BackendUnavailable:
        return BackendUnavailable(
            f"stale_guard cannot use the completion count of {key!r} ({path}): {exc.strerror}",
            key=key,
        )


class RedisCompletions:
    """An ``INCR`` counter per (function, key), in the lock's hash tag."""

    def __init__(self, backend: RedisBackend, scope: str, lock_key: Callable[[str], str]) -> None:
        self._backend = backend
        self._scope = scope
        self._lock_key = lock_key

    def _name(self, key: str) -> str:
        full = self._lock_key(key)
        return self._backend.layout.completions(full, _digest(self._scope, full))

    def arrive_sync(self, key: str) -> int:
        from .backends.redis._wire import map_errors

        client = self._backend._sync()
        with map_errors(key, self._backend._where):
            return int(client.get(self._name(key)) or 0)

    def completed_since_sync(self, key: str, arrived: int) -> bool:
        return self.arrive_sync(key) > arrived

    def complete_sync(self, key: str) -> None:
        from .backends.redis._wire import map_errors

        client = self._backend._sync()
        name = self._name(key)
        with map_errors(key, self._backend._where):
            pipe = client.pipeline(transaction=False)
            pipe.incr(name)
            pipe.expire(name, REDIS_IDLE_EXPIRY)
            pipe.execute()

    async def arrive(self, key: str) -> int:
        from .backends.redis._wire import map_errors

        client = self._backend._async()
        with map_errors(key, self._backend._where):
            return int(await client.get(self._name(key)) or 0)

    async def completed_since(self, key: str, arrived: int) -> bool:
        return await self.arrive(key) > arrived

    async def complete(self, key: str) -> None:
        from .backends.redis._wire import map_errors

        client = self._backend._async()
        name = self._name(key)
        with map_errors(key, self._backend._where):
            pipe = client.pipeline(transaction=False)
            pipe.incr(name)
            pipe.expire(name, REDIS_IDLE_EXPIRY)
            await pipe.execute()

    def leave(self, key: str) -> None:
        return None


def _lock_key(locks: KeyedLock) -> Callable[[str], str]:
    """The key the backend stores for *locks*' *key* (the registry's full key)."""
    prefix = locks._prefix
    return lambda key: prefix + key


def for_lock(locks: KeyedLock, scope: str) -> Completions:
    """The completion store for a guard named *scope* on *locks*: shared when the lock is."""
    backend = locks.backend
    hook = getattr(backend, "_completions", None)
    if callable(hook):
        store: Completions = hook(scope, _lock_key(locks))
        return store
    # a backend's module is loaded if one of its backends exists: no import for the others
    file_backends = sys.modules.get("keylock.backends.file")
    if file_backends is not None and isinstance(backend, file_backends.FileBackend):
        return FileCompletions(backend.directory, scope, _lock_key(locks))
    redis_backends = sys.modules.get("keylock.backends.redis")
    if redis_backends is not None and isinstance(backend, redis_backends.RedisBackend):
        return RedisCompletions(backend, scope, _lock_key(locks))
    return LocalCompletions()
