"""Backends: where lock state lives. ``MemoryBackend`` (one process), ``FileBackend`` (one host),
``RedisBackend`` (many hosts). File and Redis load lazily, so ``import keylock`` stays light."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Backend as Backend
from .base import Grant as Grant
from .base import KeyStatistics as KeyStatistics
from .memory import MemoryBackend as MemoryBackend

if TYPE_CHECKING:
    from .file import FileBackend as FileBackend
    from .redis import RedisBackend as RedisBackend

__all__ = ["Backend", "FileBackend", "Grant", "KeyStatistics", "MemoryBackend", "RedisBackend"]


def __getattr__(name: str) -> object:
    if name == "FileBackend":
        from .file import FileBackend

        return FileBackend
    if name == "RedisBackend":
        from .redis import RedisBackend

        return RedisBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
