"""Every error keylock raises on purpose; each carries the ``key`` it concerns.

::

    KeylockError
    ├── LockTimeout          (also TimeoutError)   the lock was not granted in time
    ├── LeaseLost                                   the lease expired or was taken over
    ├── StaleToken                                  a fenced write carried an old token
    ├── Superseded                                  a stale_guard call was dropped
    ├── InvalidKey           (also ValueError)      the key is not a usable lock key
    ├── LimitMismatch        (also ValueError)      a permit key is in use with another limit
    └── BackendUnavailable                          the store could not be reached

Misuse of the API itself (releasing a lease twice, a wrong argument type) raises the
builtin ``RuntimeError``/``TypeError``/``ValueError`` instead, as trio does.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "InvalidKey",
    "KeylockError",
    "LeaseLost",
    "LimitMismatch",
    "LockTimeout",
    "StaleToken",
    "Superseded",
]


class KeylockError(Exception):
    """Base of every keylock error; ``key`` names the lock key involved (or None)."""

    _stored_key = True  # ``key`` comes from a backend (namespace encoded in)

    def __init__(self, message: str, *, key: object = None) -> None:
        if isinstance(key, str) and "\x00" in key and self._stored_key:
            # a backend names the key as stored, "namespace NUL key": show it as people write it
            key = key.replace("\x00", ":")
            message = message.replace("\\x00", ":")
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[object, ...]:
        # keyword-only ``key`` would be lost by the default pickling of exceptions
        return (_rebuild, (type(self), str(self), self.key))


def _rebuild(cls: type[KeylockError], message: str, key: object) -> KeylockError:
    return cls(message, key=key)


class LockTimeout(KeylockError, TimeoutError):
    """The lock for ``key`` was not granted before the timeout; nothing is held."""


class LeaseLost(KeylockError):
    """The lease on ``key`` expired or was taken over: the critical section was not protected."""


class StaleToken(KeylockError):
    """A fenced write on ``key`` carried a token older than one already seen; nothing changed."""


class Superseded(KeylockError):
    """A ``stale_guard`` call on ``key`` was dropped because its snapshot went stale."""


class InvalidKey(KeylockError, ValueError):
    """``key`` cannot be used as a lock key (wrong type, empty, too long, or contains NUL)."""

    _stored_key = False  # ``key`` is the caller's own, shown as given


class LimitMismatch(KeylockError, ValueError):
    """``key`` is held or awaited as a semaphore of another limit: nothing was granted (two
    clients that disagree about the limit never get ``limit + 1`` holders)."""


class BackendUnavailable(KeylockError):
    """The backend's store could not be reached for ``key``; nothing was granted."""
