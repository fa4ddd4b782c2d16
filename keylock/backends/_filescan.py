"""Looking at a lock directory without taking part: who holds a key or its permits
(statistics), and removing the lock files and permit files nobody holds (``FileBackend.prune``).

These lock through portalocker; the acquire and release path calls flock directly
(:mod:`keylock.backends._fileshared`), where portalocker's flag enums cost ~10 µs a call.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from typing import TYPE_CHECKING, NamedTuple

import portalocker

from ._filepaths import file_name
from ._filepermitline import LINE, LINE_SIZE, parse_line, ticket
from ._filepermitwait import RECORD
from ._filerecord import read_record
from ._fileshared import try_flock
from .base import RW_LIMIT

if TYPE_CHECKING:
    from ._filepaths import LockDirectory

__all__ = ["Probe", "probe", "probe_permits", "prune"]

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
    return removed + prune_permits(files, idle_for, now)


_PERMIT_FILE = re.compile(r"\.(?:slot\d+|rw|join|limit|wait|t\d+)")  # (.limit, .wait: old ones)


def prune_permits(files: LockDirectory, idle_for: float, now: float) -> int:
    """Remove the permit files of every key nobody holds or waits for (no LOCK_SH on its
    ``.join``) whose gate file is untouched for *idle_for* seconds; return how many. Under
    the gate's LOCK_EX, which every claim takes before it joins: one that opened the gate
    before it went sees it unlinked (st_nlink 0) and opens the new one."""
    names = [entry.name for entry in os.scandir(files.fd) if entry.is_file(follow_symlinks=False)]
    removed = 0
    for gate in names:
        if not gate.endswith(".gate"):
            continue
        base = gate[: -len(".gate")]
        mine = [n for n in names if n.startswith(base) and _PERMIT_FILE.fullmatch(n[len(base) :])]
        removed += _prune_key(files, base, mine, idle_for, now)
    return removed


def _prune_key(
    files: LockDirectory, base: str, names: list[str], idle_for: float, now: float
) -> int:
    gate = files.open_name(base + ".gate", writable=True)
    if gate is None:
        return 0
    try:
        if now - os.fstat(gate).st_mtime < idle_for or not try_flock(gate):
            return 0
        if os.fstat(gate).st_nlink == 0:  # another pruner's
            return 0
        join = files.open_name(base + ".join")
        try:
            if join is not None and not try_flock(join):
                return 0  # a holder or a waiter
            removed = 0
            for name in [*names, base + ".gate"]:  # (the gate last: we hold it)
                with contextlib.suppress(FileNotFoundError):
                    files.unlink(name)
                    removed += 1
            return removed
        finally:
            if join is not None:
                os.close(join)
    finally:
        os.close(gate)


class Probe(NamedTuple):
    """What the permit files of a key say, read without waiting for anything."""

    held: bool  # some process holds a permit
    holders: int  # how many exclusive slots are held (an RW key: 1 if any permit is)
    token: int | None  # the newest grant's
    owner: bytes | None
    at_gate: int  # how many claims wait in the key's line (of every process)


def probe_permits(files: LockDirectory, key: str, limit: int) -> Probe:
    """The permit files of *key* (LOCK_SH probes: a holder's LOCK_EX makes them fail)."""
    base = file_name(key)[: -len(".lock")]
    names = [base + ".rw"] if limit == RW_LIMIT else [f"{base}.slot{i}" for i in range(limit)]
    how = fcntl.LOCK_EX if limit == RW_LIMIT else fcntl.LOCK_SH  # (readers hold LOCK_SH)
    # (a claim holds LOCK_EX on its ticket file: either probe fails on it)
    holders = sum(_busy(files, name, how) for name in names)
    token = owner = None
    at_gate = 0
    fd = files.open_name(base + ".gate")
    if fd is not None:
        try:
            fields = os.pread(fd, RECORD, 0).split()
            served, following = parse_line(os.pread(fd, LINE_SIZE, LINE))
        finally:
            os.close(fd)
        at_gate = sum(_busy(files, ticket(base, n), how) for n in range(served + 1, following))
        token = int(fields[0]) if fields and fields[0].isdigit() else None
        if len(fields) >= 4:
            with contextlib.suppress(ValueError):
                owner = bytes.fromhex(fields[3].decode("ascii", "replace"))
    return Probe(holders > 0, holders, token, owner, at_gate)


def _busy(files: LockDirectory, name: str, how: int) -> bool:
    fd = files.open_name(name)
    if fd is None:
        return False
    try:
        return not try_flock(fd, how)  # (closing fd drops the probe's lock)
    finally:
        os.close(fd)
