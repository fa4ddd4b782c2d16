"""Argument checks shared by every entry point; each error names the key and the fix."""

from __future__ import annotations

import math

from .errors import InvalidKey

__all__ = [
    "MAX_KEY_LENGTH",
    "MIN_TTL",
    "check_backend_ttl",
    "check_key",
    "check_namespace",
    "check_timeout",
    "check_ttl",
]

#: Longest accepted key, in characters. Long enough for any id-based key, short enough that a
#: key always fits a Redis key, a file name (after hashing) and a log line.
MAX_KEY_LENGTH = 1024

#: Shortest accepted lease TTL, in seconds: Redis counts in milliseconds, and a shorter lease
#: would lapse before its holder could do anything under it.
MIN_TTL = 0.001


def check_key(
    key: object, what: str = "lock key", longest: int = MAX_KEY_LENGTH, why: str = ""
) -> str:
    """Return *key* if it is a usable key, else raise InvalidKey saying why; *what* names it
    in the message ("lock key", "single-flight key"); *longest* is its length limit, which
    *why* explains when it is not MAX_KEY_LENGTH (a key held under a prefix)."""
    if type(key) is str and 0 < len(key) <= longest and "\x00" not in key:
        return key
    if not isinstance(key, str):
        raise InvalidKey(
            f"{what} {key!r} has type {type(key).__name__}, not str: "
            f"build a string key, e.g. f'agent:{{id}}'",
            key=key,
        )
    if not key:
        raise InvalidKey(f"{what} is empty: name what it is for, e.g. 'job:7'", key=key)
    if len(key) > longest:
        raise InvalidKey(
            f"{what} {key[:40]!r}... is {len(key)} characters long, over the "
            f"{longest} allowed{why}: use a short id or a hash of it instead",
            key=key,
        )
    if "\x00" in key:
        raise InvalidKey(f"{what} {key!r} contains a NUL character: remove it", key=key)
    return str(key)  # a str subclass: use a plain copy so hashing and storage stay predictable


def check_timeout(timeout: object, key: str) -> float | None:
    """Return *timeout* as None (wait forever), 0 (one try) or a positive number of seconds."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout for {key!r} must be a number of seconds or None, not {timeout!r}")
    if not timeout >= 0:  # catches NaN too
        raise ValueError(
            f"timeout for {key!r} is {timeout!r}: use None to wait forever, 0 to try once, "
            "or a positive number of seconds"
        )
    return None if timeout == math.inf else float(timeout)


def check_ttl(ttl: object, key: str) -> float | None:
    """Return *ttl* as None (backend default / no expiry) or a positive finite number."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl for {key!r} must be a number of seconds or None, not {ttl!r}")
    if not MIN_TTL <= ttl < math.inf:  # catches NaN too
        raise ValueError(
            f"ttl for {key!r} is {ttl!r}: a lease TTL must be a finite number of seconds, at "
            f"least {MIN_TTL} (or None for the backend's default)"
        )
    return float(ttl)


def check_backend_ttl(ttl: object, backend: str, *, required: bool = False) -> float | None:
    """A backend's default TTL, held to the same rules as a per-call ``ttl`` (None: no expiry,
    unless *required*)."""
    if ttl is None and not required:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"{backend}(ttl=...) must be a number of seconds, not {ttl!r}")
    if not MIN_TTL <= ttl < math.inf:  # catches NaN too
        raise ValueError(
            f"{backend}(ttl={ttl!r}): a lease TTL must be a finite number of seconds, at least "
            f"{MIN_TTL}" + ("" if required else " (or None for leases that never expire)")
        )
    return float(ttl)


def check_namespace(namespace: object) -> str:
    """Return *namespace* if usable: a str without NUL (NUL separates it from the key)."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, not {type(namespace).__name__}")
    if "\x00" in namespace:
        raise ValueError(f"namespace {namespace!r} contains a NUL character: remove it")
    if len(namespace) > MAX_KEY_LENGTH:
        raise ValueError(
            f"namespace {namespace[:40]!r}... is longer than {MAX_KEY_LENGTH} characters"
        )
    return str(namespace)
