"""FileBackend's process-level bookkeeping: waiting marks survive prune(), a forked child never
keeps a parent's OS lock, the step-aside table does not grow with keys."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from keylock import KeyedLock
from keylock.backends import FileBackend
from keylock.backends import file as file_module
from keylock.backends.file import file_name

_HOLD = textwrap.dedent(
    """
    import sys
    from keylock import KeyedLock
    from keylock.backends import FileBackend
    locks = KeyedLock(FileBackend(sys.argv[1]))
    with locks.sync("hot"):
        print("held", flush=True)
        sys.stdin.readline()
    """
)


def _marked_as_waiting(path: Path) -> bool:
    """Asked from another process: is someone's waiting mark (a read lock on byte 1) there?"""
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)\n"
        "except OSError:\n"
        "    print('marked')\n"
        "else:\n"
        "    print('free')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "marked"


def test_prune_keeps_the_waiting_mark_of_a_caller_in_this_process(tmp_path: Path) -> None:
    """Row 16 (adv_29): prune() opened and closed every lock file, and closing any descriptor
    of a file drops this process's POSIX locks on it: the waiting mark vanished, and a busy
    holder elsewhere kept the key (waits up to 2.6 s, timeouts). Fails before the fix: the
    probe reads 'free' after prune()."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        backend = FileBackend(tmp_path)
        locks = KeyedLock(backend)
        got = threading.Event()

        def wait() -> None:
            with locks.sync("hot", timeout=30):
                got.set()

        waiter = threading.Thread(target=wait)
        waiter.start()
        path = tmp_path / file_name("hot")
        deadline = time.monotonic() + 10
        while not _marked_as_waiting(path):  # bounded poll until the waiter marked itself
            assert time.monotonic() < deadline, "the waiter never marked itself"
        assert backend.prune() == 0  # the held file is not removed ...
        assert _marked_as_waiting(path)  # ... and our waiting mark is still there
        holder.stdin.write("\n")
        holder.stdin.flush()
        waiter.join(30)
        assert got.is_set()
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()


def test_the_step_aside_table_does_not_keep_an_entry_per_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row 31 (adv_16): an entry per key released while another process waited stayed
    forever (2,000 after 2,000 keys); now an entry lasts its 50 ms (on a clock this test
    moves, so a slow machine cannot age the entries early)."""
    now = [1000.0]
    monkeypatch.setattr(file_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    backend = FileBackend(tmp_path)
    for i in range(500):
        backend._step_aside(f"k{i}", i)
    assert len(backend._shared.aside) == 500
    now[0] += 0.06
    backend._step_aside("last", 1)
    assert list(backend._shared.aside) == ["last"]


def test_a_forked_child_closes_every_lock_file_the_parent_had_open(tmp_path: Path) -> None:
    """Row 14 (adv_18): a fork between another thread's flock and its bookkeeping left the
    child an unregistered descriptor holding the lock, so the key stayed locked after the
    parent died. Every descriptor is now tracked from open to close, and a fork waits for the
    tier's mutex; the child's descriptor table must hold none of the lock files."""
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    held = [locks.acquire_sync(f"job:{i}") for i in range(20)]
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            with locks.sync("churn"):
                pass

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(5):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                lock_files = 0
                for fd in range(3, 1024):
                    if fd == write:
                        continue
                    try:
                        target = os.readlink(f"/proc/self/fd/{fd}")
                    except OSError:
                        continue
                    lock_files += target.endswith(".lock")
                os.write(write, str(lock_files).encode())
                os._exit(0)
            os.close(write)
            with os.fdopen(read) as pipe:
                answer = pipe.read()
            os.waitpid(pid, 0)
            assert answer == "0"
    finally:
        stop.set()
        thread.join()
        for lease in held:
            lease.release_sync()
    assert fcntl  # (the POSIX locks the tests reason about)
