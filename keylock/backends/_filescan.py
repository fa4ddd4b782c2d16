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

from ._filepaths import file_name, open_plain
from ._filepermitline import GATE_SIZE, LIMIT, LINE, LINE_SIZE, parse_line, ticket
from ._filepermitrecord import read_holder, readers
from ._filepermitwait import RECORD
from ._filerecord import read_record
from ._fileshared import try_flock
from .base import RW_LIMIT

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._filepaths import LockDirectory

__all__ = ["PermitHolder", "PermitKey", "Probe", "permit_keys", "probe", "probe_permits", "prune"]

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


class PermitHolder(NamedTuple):
    """One holder of a permit key, as its files show it (None: not recorded)."""

    permit: str  # "slot 2", "writer", or "3 readers" (readers share one record: the count)
    token: int | None
    pid: int | None
    owner: str | None  # hex


class PermitKey(NamedTuple):
    """A permit key whose permits some process holds, read without waiting for anything."""

    stored: str | None  # the key as stored (None: a gate file from before keys were recorded)
    name: str  # its files' common name
    limit: int | None
    live: int  # permits held: slots, or readers (an upper bound: a dead one counts till seen)
    holders: list[PermitHolder]
    waiting: int  # claims in its line


def permit_keys(dir_fd: int) -> Iterator[PermitKey]:
    """Every permit key in the lock directory *dir_fd* with a permit held now."""
    names = sorted(e.name for e in os.scandir(dir_fd) if e.is_file(follow_symlinks=False))
    for gate_name in names:
        if not gate_name.endswith(".gate"):
            continue
        base = gate_name[: -len(".gate")]
        gate = open_plain(dir_fd, gate_name)
        if gate is None:
            continue
        try:
            raw = os.pread(gate, max(os.fstat(gate).st_size, GATE_SIZE), 0)  # (a long key)
        finally:
            os.close(gate)
        newest = raw[:LINE].split()  # token seq pid owner: the newest grant's
        holders, live = _holders(dir_fd, base, names, _reader(newest))
        if not holders:
            continue
        fields = raw[LIMIT:].split()
        limit = int(fields[0]) if fields and fields[0].isdigit() else None
        stored = None
        if len(fields) > 1:
            with contextlib.suppress(ValueError):
                stored = bytes.fromhex(fields[1].decode("ascii")).decode("utf-8", "surrogatepass")
        served, following = parse_line(raw[LINE : LINE + LINE_SIZE])
        waiting = sum(
            _held(dir_fd, ticket(base, n), fcntl.LOCK_SH) for n in range(served + 1, following)
        )
        yield PermitKey(stored, base, limit, live, holders, waiting)


def _reader(fields: list[bytes]) -> PermitHolder:
    """The newest grant of a gate's record *fields*: the newest reader's, if readers hold."""
    numbers = [int(f) if f.isdigit() else None for f in fields[:3]] + [None] * 3
    owner = fields[3].decode("ascii", "replace") if len(fields) > 3 else None
    return PermitHolder("readers", numbers[0], numbers[2], owner)


def _holders(
    dir_fd: int, base: str, names: list[str], newest: PermitHolder
) -> tuple[list[PermitHolder], int]:
    """The holders of *base*'s permits (one per grant: its slots together; readers as one,
    shown by the newest grant), and how many permits they hold."""
    found: list[PermitHolder] = []
    slots: dict[tuple[int | None, int | None, str | None], list[str]] = {}
    live = 0
    for name in names:
        suffix = name[len(base) :] if name.startswith(base) else ""
        if suffix != ".rw" and not re.fullmatch(r"\.slot\d+", suffix):
            continue
        fd = open_plain(dir_fd, name)
        if fd is None:
            continue
        try:
            if not try_flock(fd, fcntl.LOCK_SH):  # an exclusive holder: its record
                holder = read_holder(os.pread(fd, RECORD, 0))
                live += 1
                if suffix == ".rw":
                    found.append(PermitHolder("writer", *holder))
                else:
                    slots.setdefault(holder, []).append(suffix[len(".slot") :])
            elif suffix == ".rw" and not try_flock(fd, fcntl.LOCK_EX):  # readers
                count = max(readers(fd), 1)
                live += count
                found.append(newest._replace(permit=f"{count} readers (newest)"))
        finally:
            os.close(fd)
    for holder, held in slots.items():
        permit = f"slot{'s' * (len(held) > 1)} {', '.join(sorted(held, key=int))}"
        found.append(PermitHolder(permit, *holder))
    return found, live


def _held(dir_fd: int, name: str, how: int) -> bool:
    fd = open_plain(dir_fd, name)
    if fd is None:
        return False
    try:
        return not try_flock(fd, how)
    finally:
        os.close(fd)
