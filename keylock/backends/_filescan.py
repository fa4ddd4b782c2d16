"""Looking at a lock directory without taking part: who holds a key (statistics), and
removing the files nobody holds (``FileBackend.prune``).

These lock through portalocker; the acquire and release path calls flock directly
(:mod:`keylock.backends._fileshared`), where portalocker's flag enums cost ~10 µs a call.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import portalocker

from ._filepaths import file_name
from ._filerecord import read_record

if TYPE_CHECKING:
    from ._filepaths import LockDirectory

__all__ = ["probe", "prune"]

_LOCK_NB = portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING
_SHARED_NB = portalocker.LockFlags.SHARED | portalocker.LockFlags.NON_BLOCKING


def probe(files: LockDirectory, key: str) -> tuple[int | None, bytes | None, bool]:
    """(token, owner, held by a process) from *key*'s lock file, without waiting."""
    fd = files.open_name(file_name(key))
    if fd is None:  # never locked, or pruned
        return None, None, False
    try:
        record = read_record(fd, with_key=False)
        token, owner = record.token, record.owner
        try:
            portalocker.lock(fd, _SHARED_NB)
        except portalocker.AlreadyLocked:
            return token, owner, True
        portalocker.unlock(fd)
        return token, owner, False
    finally:
        os.close(fd)


def prune(files: LockDirectory, skip: set[int], idle_for: float) -> int:
    """Remove the lock files of *files* nobody holds and untouched for *idle_for* seconds,
    except those whose inode is in *skip*; return how many. A file is unlinked only while
    locked, so an acquirer racing it notices (inode re-check) and retries on the new one."""
    removed = 0
    now = time.time()
    for name in files.lock_names():
        try:
            if os.stat(name, dir_fd=files.fd, follow_symlinks=False).st_ino in skip:
                continue
        except OSError:
            continue
        fd = files.open_name(name, writable=True)
        if fd is None:  # gone, or not a plain lock file: not ours to remove
            continue
        try:
            if now - os.fstat(fd).st_mtime < idle_for:
                continue
            try:
                portalocker.lock(fd, _LOCK_NB)
            except portalocker.AlreadyLocked:
                continue
            try:
                files.unlink(name)
                removed += 1
            finally:
                portalocker.unlock(fd)
        finally:
            os.close(fd)
    return removed
