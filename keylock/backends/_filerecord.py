"""The record at the start of each lock file: its last holder's token, pid, expiry and owner,
whether that holder released it, and the full key.

Guarantees:

* The first RECORD_SIZE bytes are ``token pid expires_at owner`` as space-padded text, the
  token first, so readers of older keylock versions keep working; the key follows as one
  JSON string and a newline (ASCII-escaped: any key, NUL and lone surrogates included).
* The last byte of those RECORD_SIZE bytes says whether the lease the record describes ended
  by its holder's release: ``H`` is written with the record (granted), ``R`` by a clean
  release just before the OS lock is dropped. A new holder that finds ``H`` follows a lease
  that ended otherwise (its process died, or its TTL ran out before its release): it took the
  key over. A record written before the mark existed (a blank there) reads as released.
* Readers never raise on a malformed record: its fields read as None.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

_S = TypeVar("_S")
_T = TypeVar("_T")

__all__ = [
    "RECORD_SIZE",
    "Record",
    "mark_released",
    "read_last",
    "read_record",
    "read_token",
    "write_record",
]

RECORD_SIZE = 128  # bytes of the record at the start of each lock file; the key follows it
_KEY_AREA_MAX = 256 * 1024  # a full key (namespace, NUL, 1,024 characters) JSON-escaped fits
_MARK_AT = RECORD_SIZE - 1  # the byte saying whether the record's lease was released
_HELD = b"H"
_RELEASED = b"R"


@dataclass(frozen=True)
class Record:
    """What a lock file says about its last holder (fields None where missing or unreadable)."""

    token: int | None
    pid: int | None
    expires_at: float | None  # wall clock (time.time())
    owner: bytes | None
    key: str | None  # the full key, if the file was written by a keylock that stores it
    released: bool | None = None  # its holder released it (None: no mark, an older keylock)


def write_record(
    fd: int, token: int, pid: int, expires_at: float | None, owner: bytes, key: str
) -> None:
    """Rewrite the record of the lock file *fd* for a new holder, marked held (its holder
    calls this, under the OS lock)."""
    expires = "-" if expires_at is None else f"{expires_at:.6f}"
    line = f"{token} {pid} {expires} {owner.hex()}\n".encode().ljust(_MARK_AT) + _HELD
    os.pwrite(fd, line + _key_line(key), 0)


@functools.lru_cache(maxsize=1024)
def _key_line(key: str) -> bytes:
    return json.dumps(key).encode() + b"\n"


def mark_released(fd: int) -> None:
    """Mark the record's lease released (its holder calls this, under the OS lock, when it
    releases a live lease): the next holder did not take the key over."""
    os.pwrite(fd, _RELEASED, _MARK_AT)


def read_token(fd: int) -> int | None:
    """The last token written to the lock file *fd* (None for a new or unreadable file)."""
    first = os.pread(fd, RECORD_SIZE, 0).split(b" ", 1)[0]
    return int(first) if first.isdigit() else None


def read_last(fd: int) -> tuple[int | None, bool]:
    """(the last token, whether its lease ended without its holder's release) in one read:
    what a new holder of the lock file *fd* mints from and reports as ``took_over``."""
    head = os.pread(fd, RECORD_SIZE, 0)
    first = head.split(b" ", 1)[0]
    token = int(first) if first.isdigit() else None
    return token, token is not None and head[_MARK_AT:] == _HELD


def read_record(fd: int, *, with_key: bool = True) -> Record:
    """The record of the lock file *fd*; never raises on a malformed one (fields become None)."""
    data = os.pread(fd, RECORD_SIZE + (_KEY_AREA_MAX if with_key else 0), 0)
    head = data[:RECORD_SIZE]
    token, pid, expires, owner = (head[:_MARK_AT].split() + [b""] * 4)[:4]
    line, newline, _ = data[RECORD_SIZE:].partition(b"\n")
    key = _parse(json.loads, line) if newline else None
    mark = head[_MARK_AT:]
    return Record(
        token=int(token) if token.isdigit() else None,
        pid=int(pid) if pid.isdigit() else None,
        expires_at=_parse(float, expires),
        owner=_parse(bytes.fromhex, owner.decode("ascii", "replace")) if owner else None,
        key=key if isinstance(key, str) else None,
        released=True if mark == _RELEASED else False if mark == _HELD else None,
    )


def _parse(parse: Callable[[_S], _T], text: _S) -> _T | None:
    """parse(text), or None if it raises ValueError (a malformed record field)."""
    try:
        return parse(text)
    except ValueError:
        return None
