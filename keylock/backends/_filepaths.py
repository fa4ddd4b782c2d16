"""FileBackend's lock directory and lock files: from a directory and a key to an opened,
verified lock file (the record inside it: :mod:`keylock.backends._filerecord`).

Guarantees:

* The directory is reached by an ``openat`` walk from ``/``, one component at a time with
  ``O_NOFOLLOW | O_DIRECTORY``: a symlink anywhere in the path is refused, never followed.
  Missing components are created with the mode's directory mode (exactly, whatever the umask).
* Unless the caller passes ``trust_directory=True``, the directory must be safe to rely on:
  owned by this user (``mode="group"``: or by one of this user's groups) and not writable by
  others (``"private"``: nor by its group), and every directory above it owned by root or this
  user and not writable by anyone else unless sticky (as ``/tmp`` and ``/run/lock`` are).
  Whoever can write the lock directory, or rename it, can give two processes one key at once.
* A lock file is opened ``O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`` relative to the directory's
  descriptor and checked with ``fstat`` before anything is written to it: a symlink, a hard
  link (``st_nlink > 1``) or anything but a regular file is refused with BackendUnavailable.
  Files are created with the mode's file mode, exactly (``fchmod`` after create).
* Each key has one file name: at most 64 readable characters of the key, then 128 bits of its
  SHA-256, so two keys share a file only by a SHA-256 collision, for any key (NUL included).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import stat
from typing import TYPE_CHECKING, Literal

from ..errors import BackendUnavailable

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "MODES",
    "LockDirectory",
    "Mode",
    "check_directory",
    "file_name",
    "open_plain",
]

Mode = Literal["private", "group"]
# mode -> (directory mode, file mode): "group" shares the files with the directory's group
# (setgid, so files created by any member get that group); nobody else may read them.
MODES: dict[str, tuple[int, int]] = {"private": (0o700, 0o600), "group": (0o2770, 0o660)}

_HASH_HEX = 32  # 128 bits of SHA-256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a planted FIFO must not wait for a writer; O_NOCTTY: a planted terminal
# must not become ours. Neither changes anything for a regular file.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


@functools.lru_cache(maxsize=4096)
def file_name(key: str) -> str:
    """The lock file's name for *key*: readable where possible, always unique and contained.

    ``<readable>.<hash>.lock``: *readable* keeps the key's ``[A-Za-z0-9._-]`` characters (at
    most 64, others become ``_``, leading dots dropped) and *hash* is 32 hex digits (128 bits)
    of the key's SHA-256, so no key can name a path outside the directory (no ``/``, no ``..``,
    no NUL, at most 102 characters) and two keys never share a file.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", key[:64]).lstrip(".") or "key"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]
    return f"{readable}.{digest}.lock"


def check_directory(directory: object) -> str:
    """The absolute path of a FileBackend *directory* argument; TypeError/ValueError if it is
    not a usable path (the empty string would silently mean the current directory)."""
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(
            f"FileBackend directory must be a str or os.PathLike, not {type(directory).__name__}"
        )
    path = os.fspath(directory)
    if not isinstance(path, str):
        raise TypeError(f"FileBackend directory must be a text path, not {type(path).__name__}")
    if not path:
        raise ValueError(
            "FileBackend directory is empty: name the lock directory "
            "(e.g. FileBackend('/run/lock/myapp')); '.' if you mean the current one"
        )
    if "\x00" in path:
        raise ValueError(f"FileBackend directory {path!r} contains NUL: no file system path does")
    return os.path.abspath(path)


def _groups() -> set[int]:
    return {os.getegid(), *os.getgroups()}


_KINDS = {stat.S_IFLNK: "a symlink", stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO"}
_KINDS |= {stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "a file")


class LockDirectory:
    """An open, verified lock directory; opens and checks the lock files in it.

    Operations go through the directory's descriptor, so renaming or replacing the path later
    cannot redirect them. Raises BackendUnavailable (with the path and the fix) if the
    directory cannot be opened, is reached through a symlink, or is not safe to rely on (see
    the module's docstring; ``trust_directory=True`` skips the owner and mode checks only).
    """

    def __init__(self, path: str, *, mode: Mode = "private", trust_directory: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"FileBackend mode must be 'private' or 'group', not {mode!r}")
        if not isinstance(trust_directory, bool):
            raise TypeError(
                f"trust_directory must be True or False, not {type(trust_directory).__name__}"
            )
        self.path = path
        self.mode = mode
        self.dir_mode, self.file_mode = MODES[mode]
        self.trust = trust_directory
        self.fd = self._open()

    def close(self) -> None:
        """Close the directory's descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ------------------------------------------------------------------------ the directory

    def _open(self) -> int:
        fd = os.open("/", _DIR_FLAGS)
        where = "/"
        try:
            for part in self.path.split("/"):
                if not part:
                    continue
                if not self.trust:
                    self._check_ancestor(fd, where)
                child = self._open_or_create(fd, part, os.path.join(where, part))
                os.close(fd)
                fd, where = child, os.path.join(where, part)
            if not self.trust:
                self._check_directory(os.fstat(fd))
            if not os.access(".", os.W_OK | os.X_OK, dir_fd=fd):
                raise BackendUnavailable(
                    f"lock directory {self.path!r} is not writable by this user: "
                    "fix its permissions or pick another directory"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_or_create(self, parent: int, part: str, where: str) -> int:
        """Open the directory *part* of *parent* (creating it if missing), never a symlink."""
        for _ in range(3):  # a racing creator or remover: try again
            try:
                try:
                    return os.open(part, _DIR_FLAGS, dir_fd=parent)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, self.dir_mode, dir_fd=parent)
                    except FileExistsError:
                        continue
                    fd = os.open(part, _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                raise self._refusal(parent, part, where, exc) from exc
            try:  # exactly the mode asked for, whatever the umask
                os.fchmod(fd, self.dir_mode)
            except PermissionError:  # setgid needs membership of the directory's group
                os.fchmod(fd, self.dir_mode & 0o777)
            return fd
        raise BackendUnavailable(f"lock directory {self.path!r}: {where!r} keeps vanishing")

    def _refusal(self, parent: int, part: str, where: str, exc: OSError) -> BackendUnavailable:
        try:
            kind = _kind(os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode)
        except OSError:
            kind = None
        if kind == "a symlink":
            return BackendUnavailable(
                f"lock directory {self.path!r}: {where!r} is a symlink: symlinks are refused "
                "anywhere in the path so nobody can redirect your lock files; pass the real "
                f"path ({os.path.realpath(self.path)!r}) if you trust the link"
            )
        if kind is not None and kind != "a directory":
            return BackendUnavailable(
                f"lock directory {self.path!r}: {where!r} is {kind}, not a directory: "
                "remove it or pick another path"
            )
        return BackendUnavailable(
            f"cannot open lock directory {self.path!r} at {where!r}: {exc.strerror}; "
            "create it or pick a directory this user may write"
        )

    def _check_ancestor(self, fd: int, where: str) -> None:
        """Refuse a directory above the lock directory that someone else could rename it in."""
        info = os.fstat(fd)
        shared_group = self.mode == "group" and info.st_gid in _groups()
        owner_ok = info.st_uid in (0, os.geteuid()) or shared_group
        sticky = bool(info.st_mode & stat.S_ISVTX)
        writable = info.st_mode & (0o002 if shared_group else 0o022)
        if owner_ok and (sticky or not writable):
            return
        why = (
            f"is owned by uid {info.st_uid}"
            if not owner_ok
            else f"is writable by others (mode {oct(info.st_mode & 0o7777)}) and not sticky"
        )
        raise BackendUnavailable(
            f"lock directory {self.path!r}: {where!r} {why}, so someone else could swap the "
            "lock directory (two holders of one key); put it under a directory owned by you or "
            "root, or pass trust_directory=True if you trust everyone who can write there"
        )

    def _check_directory(self, info: os.stat_result) -> None:
        """Refuse a lock directory that someone else could unlink or rewrite lock files in."""
        euid, group = os.geteuid(), self.mode == "group"
        if info.st_uid != euid and not (group and info.st_gid in _groups()):
            whose = f"uid {info.st_uid}, group {info.st_gid}" if group else f"uid {info.st_uid}"
            raise BackendUnavailable(
                f"lock directory {self.path!r} is owned by {whose}, not this user (uid {euid})"
                f"{' nor one of its groups' if group else ''}: its owner could unlink lock files "
                "(two holders of one key) or rewrite tokens; use a directory you own (keylock "
                "creates it), mode='group' to share one with your group, or "
                "trust_directory=True if you trust its owner"
            )
        forbidden = 0o002 if group else 0o022
        if info.st_mode & forbidden:
            raise BackendUnavailable(
                f"lock directory {self.path!r} is writable by "
                f"{'others' if group else 'its group or others'} "
                f"(mode {oct(info.st_mode & 0o7777)}): they could unlink lock files (two holders "
                f"of one key) or rewrite tokens; chmod it to {oct(self.dir_mode)}, or pass "
                "trust_directory=True if you trust everyone who can write it"
            )

    # ------------------------------------------------------------------------ the lock files

    def open_file(self, key: str, name: str | None = None) -> int:
        """*key*'s lock file (or its file *name*: a permit's), opened read-write (created if
        missing), checked to be a plain regular file with one link; BackendUnavailable naming
        the key and the file if not."""
        return self.open_key(key, name)[0]

    def open_key(self, key: str, name: str | None = None) -> tuple[int, tuple[int, int]]:
        """:meth:`open_file`, and the file's identity ``(st_dev, st_ino)`` for
        :meth:`is_current`."""
        name, flags = name or file_name(key), os.O_RDWR | _FILE_FLAGS
        try:
            try:
                fd = os.open(name, flags, dir_fd=self.fd)
            except FileNotFoundError:  # one atomic create-or-open: a racing prune() is harmless
                fd = os.open(name, flags | os.O_CREAT, self.file_mode, dir_fd=self.fd)
        except OSError as exc:
            raise self._file_error(key, exc, name) from exc
        info = self._verify(fd, key, name)
        fresh = info.st_size == 0 and info.st_uid == os.geteuid()  # new: no record yet, ours
        if fresh and info.st_mode & 0o7777 != self.file_mode:  # exactly it, whatever the umask
            os.fchmod(fd, self.file_mode)
        return fd, (info.st_dev, info.st_ino)

    def open_name(self, name: str, *, writable: bool = False) -> int | None:
        """The lock file *name* (e.g. ``file_name(key)``) if it is a plain regular file with one
        link, else None: a planted object is no holder to statistics or prune; acquire says."""
        return open_plain(self.fd, name, writable=writable)

    def lock_names(self) -> Iterator[str]:
        """The names in the directory that look like lock files (not checked: open_name is)."""
        for entry in os.scandir(self.fd):
            if entry.name.endswith(".lock") and entry.is_file(follow_symlinks=False):
                yield entry.name

    def is_current(self, key: str, ident: tuple[int, int]) -> bool:
        """True if the file opened with identity *ident* (from :meth:`open_key`) is still the
        one at *key*'s path (prune() may have unlinked it, or someone replaced it) and still a
        plain file with one link; False sends the caller back to :meth:`open_key`, which
        refuses whatever was planted there."""
        try:
            there = os.stat(file_name(key), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (there.st_dev, there.st_ino) == ident and there.st_nlink <= 1

    def unlink(self, name: str) -> None:
        """Remove the lock file *name* (the caller holds its OS lock)."""
        os.unlink(name, dir_fd=self.fd)

    def _verify(self, fd: int, key: str, name: str) -> os.stat_result:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink <= 1:
            return info
        os.close(fd)
        what = (
            f"has {info.st_nlink} hard links (a link to another file)"
            if stat.S_ISREG(info.st_mode)
            else f"is {_kind(info.st_mode)}, not a regular file"
        )
        raise BackendUnavailable(
            f"the lock file for {key!r} ({name} in {self.path}) {what}: someone planted it; "
            "remove it (nothing was written to it)",
            key=key,
        )

    def _file_error(self, key: str, exc: OSError, name: str) -> BackendUnavailable:
        if exc.errno == errno.ELOOP:
            return BackendUnavailable(
                f"the lock file for {key!r} ({name} in {self.path}) is a symlink: someone "
                "planted it; remove it (its target was not touched)",
                key=key,
            )
        if exc.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV):
            return BackendUnavailable(
                f"the lock file for {key!r} ({name} in {self.path}) is not a regular file "
                f"({exc.strerror}): someone planted it; remove it",
                key=key,
            )
        hint = (
            "; every user of a shared directory needs mode='group'"
            if exc.errno in (errno.EACCES, errno.EPERM)
            else ""
        )
        return BackendUnavailable(
            f"cannot open the lock file for {key!r} ({name} in {self.path}): {exc.strerror}{hint}",
            key=key,
        )


def open_plain(dir_fd: int, name: str, *, writable: bool = False) -> int | None:
    """The file *name* in the directory *dir_fd* if it is a plain regular file with one link,
    else None (for walking a lock directory: prune, inspect). Never follows a symlink."""
    try:
        fd = os.open(name, (os.O_RDWR if writable else os.O_RDONLY) | _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        return None
    return fd
