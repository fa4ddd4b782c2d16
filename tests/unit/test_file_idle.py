"""FileBackend keeps a key's lock file open between acquisitions: the file is opened once, and
every guarantee of a fresh open still holds (symlink and hard-link refusal, prune, fork,
close, a bound on open files)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from keylock import BackendUnavailable, KeyedLock
from keylock.backends import FileBackend, _fileshared
from keylock.backends.file import file_name


def _lock_files_open() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
                count += 1
    return count


def test_a_key_s_lock_file_is_opened_once_across_acquisitions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each acquire opened the key's file (openat + fstat) and each release closed it: three
    syscalls of the ~12 of an acquire+release. Fails on the code before the idle files: 100
    opens for 100 acquisitions."""
    locks = KeyedLock(FileBackend(tmp_path))
    with locks.sync("hot"):  # creates the file (two opens: the first finds none)
        pass
    name = file_name("hot")
    opens = [0]
    real_open = os.open

    def counting(path: Any, *args: Any, **kwargs: Any) -> int:
        if path == name:
            opens[0] += 1
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting)
    tokens = []
    for _ in range(100):
        with locks.sync("hot") as lease:
            tokens.append(lease.token)
    assert opens[0] == 0
    assert tokens == sorted(set(tokens))  # still minted from the file, strictly increasing


def test_a_symlink_planted_after_an_acquire_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    """The kept file is no longer at the path: the next acquire opens the path again, which
    refuses the symlink; nothing is written to its target."""
    locks_dir = tmp_path / "locks"
    locks = KeyedLock(FileBackend(locks_dir))
    with locks.sync("job"):
        pass
    target = tmp_path / "precious.txt"
    target.write_text("do not touch")
    path = locks_dir / file_name("job")
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(BackendUnavailable, match="symlink"), locks.sync("job"):
        pass
    assert target.read_text() == "do not touch"
    assert locks.statistics("job").waiting == 0


@pytest.mark.parametrize("how", ["replaced", "linked"])
def test_a_hard_link_planted_after_an_acquire_is_refused(tmp_path: Path, how: str) -> None:
    """A hard link to another file put at the path (replaced), or a second link to the kept
    file itself (linked): the next acquire is refused as a fresh open would refuse it."""
    locks_dir = tmp_path / "locks"
    locks = KeyedLock(FileBackend(locks_dir))
    with locks.sync("job"):
        pass
    path = locks_dir / file_name("job")
    secret = tmp_path / "secret.txt"
    if how == "replaced":
        secret.write_text("TOP SECRET " * 20)
        path.unlink()
        os.link(secret, path)
    else:
        os.link(path, secret)
        before = secret.read_bytes()
    with pytest.raises(BackendUnavailable, match="2 hard links"):
        locks.acquire_sync("job", timeout=0)
    if how == "replaced":
        assert secret.read_text() == "TOP SECRET " * 20
    else:
        assert secret.read_bytes() == before  # no record written through the kept file
    assert locks.statistics("job").held is False


def test_prune_removes_a_file_this_process_keeps_idle(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    with locks.sync("a") as first:
        pass
    assert backend.prune() == 1
    assert os.listdir(tmp_path) == []
    with locks.sync("a") as second:  # a new file, and tokens still rise
        assert second.token > first.token


def test_idle_files_are_bounded_and_closed_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fileshared, "IDLE_FILES", 4)
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    before = _lock_files_open()
    for i in range(10):
        with locks.sync(f"k{i}"):
            pass
    assert list(backend._shared.idle) == ["k6", "k7", "k8", "k9"]  # the last released kept
    assert _lock_files_open() == before + 4
    assert backend._shared.fds == set()
    backend.close_sync()
    assert _lock_files_open() == before


def test_a_backend_collected_while_its_tier_is_locked_does_not_wait_for_it(
    tmp_path: Path,
) -> None:
    """A backend's finalizer can run anywhere, also inside a block holding its tier's mutex
    (or in a fork's child, where the fork holds it): it must not take that mutex."""
    keep = FileBackend(tmp_path)
    dropped = FileBackend(tmp_path)
    with KeyedLock(dropped).sync("a"):
        pass
    shared = keep._shared
    assert dropped._shared is shared
    assert shared.idle

    def drop() -> None:
        nonlocal dropped
        with shared.mutex:
            del dropped  # (no cycle: finalized right here)

    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert shared.idle  # the tier's, still kept for its other backends


def test_a_forked_child_does_not_inherit_idle_files(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    with locks.sync("a"):
        pass
    assert backend._shared.idle
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        answer = b"ok"
        try:
            if _lock_files_open() or backend._shared.idle:
                answer = b"idle file inherited"
            with locks.sync("a", timeout=5):
                pass
        except BaseException as exc:
            answer = repr(exc).encode()
        os.write(write, answer)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == b"ok"


def test_a_release_asks_who_waits_without_taking_a_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A releaser checked for waiting processes by taking an exclusive lock on the waiting
    byte and dropping it (two syscalls), and a process marking itself as waiting at that
    instant failed to (it then polled). On Linux it asks with one F_GETLK, which takes no lock.
    Fails on the code before: lockf called by the release."""
    locks = KeyedLock(FileBackend(tmp_path))
    with locks.sync("hot"):
        pass
    calls: list[object] = []
    real = fcntl.lockf

    def counting(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(fcntl, "lockf", counting)
    with locks.sync("hot"):
        pass
    assert calls == []
    assert _fileshared.others_wait(locks.backend._shared.idle["hot"]) is False  # type: ignore[attr-defined]


def test_a_release_sees_a_process_marked_as_waiting(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path)
    with KeyedLock(backend).sync("hot"):
        pass
    fd = backend._shared.idle["hot"]
    assert _fileshared.say_waiting(fd)  # our own mark is no other process waiting
    assert _fileshared.others_wait(fd) is False
    _fileshared.done_waiting(fd)
    ready, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        other = os.open(tmp_path / file_name("hot"), os.O_RDWR)
        _fileshared.say_waiting(other)
        os.write(ready[1], b"x")
        os.read(go[0], 1)
        os._exit(0)
    os.read(ready[0], 1)
    try:
        assert _fileshared.others_wait(fd) is True
    finally:
        os.write(go[1], b"x")
        os.waitpid(pid, 0)
    assert _fileshared.others_wait(fd) is False  # the OS dropped the mark with its process
    for end in (*ready, *go):
        os.close(end)
