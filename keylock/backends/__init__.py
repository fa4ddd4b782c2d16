"""Backends: where lock state lives. ``MemoryBackend`` (one process), ``FileBackend`` (one host),
``RedisBackend`` and ``PostgresBackend`` (many hosts). All but memory load lazily, so ``import
keylock`` stays light (and imports neither redis' nor psycopg's backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Backend as Backend
from .base import Grant as Grant
from .base import KeyStatistics as KeyStatistics
from .memory import MemoryBackend as MemoryBackend

if TYPE_CHECKING:
    from .file import FileBackend as FileBackend
    from .postgres import PostgresBackend as PostgresBackend
    from .redis import RedisBackend as RedisBackend

__all__ = [
    "Backend",
    "FileBackend",
    "Grant",
    "KeyStatistics",
    "MemoryBackend",
    "PostgresBackend",
    "RedisBackend",
]


def __getattr__(name: str) -> object:
    if name == "FileBackend":
        from .file import FileBackend

        return FileBackend
    if name == "RedisBackend":
        from .redis import RedisBackend

        return RedisBackend
    if name == "PostgresBackend":
        from .postgres import PostgresBackend

        return PostgresBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
