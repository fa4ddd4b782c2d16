"""No phantom grant when a thread is slowed between the in-process grant and its expiry.

A lease's ``expires_at`` (and so ``lease.lost``) is wall-clock time; the in-process layer of
the memory and file backends hands the key on at its own monotonic deadline. The holder's
expiry must never be later than that deadline, or the holder believes in its lease after
another caller was given the key: a phantom grant. Two ways it was later:

- ``MemoryBackend.extend_sync`` read the monotonic clock, then the wall clock: a thread switch
  between the two reads (a GIL hand-off: 5 ms, far more under load) moved the expiry;
- ``FileBackend`` took its in-process grant (deadline set), did its file I/O (lock, stat, token
  record), and only then read the wall clock for the lease's expiry.

Found by a flaky conformance run (``test_expired_lease_is_taken_over_with_a_higher_token
[file-sync]``: ``old.lost`` false right after the takeover, 2 in 7 full runs with the chaos
suite loading the machine). Here the slow step is made certain: 50 ms.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from keylock import KeyedLock
from keylock.backends import FileBackend, MemoryBackend

SLOW = 0.05


def test_an_extended_lease_is_never_believed_live_after_its_takeover(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``extend`` gives a lease 0.2 s; the thread is preempted for 50 ms before it reads the
    wall clock. A waiter takes the key at the deadline; by then the old holder must see
    ``lease.lost``. With the monotonic clock read first, ``expires_at`` was 50 ms late."""
    slow = [True]

    class PreemptedClock:  # the first wall-clock read only: the waiter's reads are prompt
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def time() -> float:
            if slow and slow.pop():
                time.sleep(SLOW)
            return time.time()

    locks = KeyedLock(MemoryBackend(clock=PreemptedClock()))
    old = locks.acquire_sync("k")
    old.extend_sync(0.2)
    new = locks.acquire_sync("k", timeout=5, ttl=5)
    believed_live = not old.lost
    new.release_sync()
    assert not believed_live, "the old holder still believed in its lease after the takeover"


def test_a_file_lease_is_never_believed_live_after_its_takeover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file lease with a 0.2 s TTL whose token record takes 50 ms to write (a slow disk, a
    preempted thread); another backend on the directory in this process takes the key over at
    the in-process deadline; by then the old holder must see ``lease.lost``. With the expiry
    read after the I/O, it was 50 ms late."""
    mint = FileBackend._next_token

    def slow_mint(fd: int, key: str, owner: bytes, ttl: float | None) -> tuple[int, bool]:
        time.sleep(SLOW)
        return mint(fd, key, owner, ttl)

    old_locks = KeyedLock(FileBackend(tmp_path / "locks"))
    new_locks = KeyedLock(FileBackend(tmp_path / "locks"))
    monkeypatch.setattr(FileBackend, "_next_token", staticmethod(slow_mint))
    old = old_locks.acquire_sync("k", ttl=0.2)
    monkeypatch.setattr(FileBackend, "_next_token", staticmethod(mint))
    new = new_locks.acquire_sync("k", timeout=5, ttl=5)
    believed_live = not old.lost
    new.release_sync()
    assert not believed_live, "the old holder still believed in its lease after the takeover"
