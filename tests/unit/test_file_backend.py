"""FileBackend specifics: safe file names, symlink attacks, bad directories, persisted tokens,
prune, and the lock-file record."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

import pytest

from keylock import BackendUnavailable, KeyedLock, LockTimeout
from keylock.backends import FileBackend
from keylock.backends.file import file_name

HOSTILE_KEYS = [
    "../../etc/passwd",
    "/etc/shadow",
    "..",
    ".hidden",
    "a/b\\c",
    "line\nbreak",
    "glob*?[x]",
    "é" * 300,
    "x" * 1024,
    "CON",
]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_map_to_plain_names_inside_the_directory(key: str, tmp_path: Path) -> None:
    name = file_name(key)
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    assert not name.startswith(".")
    assert len(name) <= 64 + 1 + 32 + 5  # readable part, 128-bit hash, ".lock"
    locks = KeyedLock(FileBackend(tmp_path))
    with locks.sync(key):
        pass
    assert os.listdir(tmp_path) == [name]  # nothing created anywhere else


def test_distinct_keys_never_share_a_file() -> None:
    keys = ["a:b", "a_b", "a/b", "a?b", "A:b", "x" * 100, "x" * 101]
    assert len({file_name(k) for k in keys}) == len(keys)


def test_a_planted_symlink_fails_acquire_and_leaves_the_target_alone(tmp_path: Path) -> None:
    """filelock CVE-2025-68146: a symlink at the lock path made acquiring truncate its target."""
    target = tmp_path / "precious.txt"
    target.write_text("do not touch")
    locks_dir = tmp_path / "locks"
    locks_dir.mkdir()
    (locks_dir / file_name("job:1")).symlink_to(target)
    locks = KeyedLock(FileBackend(locks_dir))
    with pytest.raises(BackendUnavailable, match="symlink"), locks.sync("job:1"):
        pass
    assert target.read_text() == "do not touch"
    assert locks.statistics("job:1").waiting == 0
    with locks.sync("job:2"):  # other keys still work
        pass


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(BackendUnavailable, match="symlink"):
        FileBackend(link)


def test_a_directory_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(BackendUnavailable):
        FileBackend(path)


def test_missing_directory_is_created_private(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "locks"
    FileBackend(directory)
    assert directory.is_dir()
    assert (directory.stat().st_mode & 0o777) == 0o700


def test_tokens_persist_across_backends(tmp_path: Path) -> None:
    first = KeyedLock(FileBackend(tmp_path))
    lease = first.acquire_sync("k")
    lease.release_sync()
    del first
    gc.collect()  # the per-directory in-process layer goes too
    second = KeyedLock(FileBackend(tmp_path))
    again = second.acquire_sync("k")
    again.release_sync()
    assert again.token > lease.token


def test_tokens_stay_above_a_recreated_file(tmp_path: Path) -> None:
    locks = KeyedLock(FileBackend(tmp_path))
    lease = locks.acquire_sync("k")
    lease.release_sync()
    (tmp_path / file_name("k")).unlink()
    again = locks.acquire_sync("k")
    again.release_sync()
    assert again.token > lease.token


def test_record_names_the_holder(tmp_path: Path) -> None:
    locks = KeyedLock(FileBackend(tmp_path), namespace="ns")
    with locks.sync("k", ttl=30) as lease:
        fields = (tmp_path / file_name("ns\x00k")).read_text().split()  # namespace NUL key
        assert int(fields[0]) == lease.token
        assert int(fields[1]) == os.getpid()
        assert float(fields[2]) > 0
        assert fields[3] == lease.owner.hex()
        stats = locks.statistics("k")
        assert stats.held
        assert stats.token == lease.token


def test_prune_removes_idle_files_only(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    for key in ("a", "b", "c"):
        with locks.sync(key):
            pass
    held = locks.acquire_sync("held")
    (tmp_path / "unrelated.txt").write_text("keep")
    assert backend.prune() == 3
    assert sorted(os.listdir(tmp_path)) == sorted([file_name("held"), "unrelated.txt"])
    with pytest.raises(LockTimeout):
        KeyedLock(FileBackend(tmp_path)).acquire_sync("held", timeout=0)
    held.release_sync()
    with locks.sync("a"):  # a pruned key is simply recreated
        pass


async def test_a_lease_never_reports_a_later_expiry_than_it_has(tmp_path: Path) -> None:
    """The lease lapses when its in-process turn does (a waiter here takes it over then), so
    ``expires_at`` must be that moment, not one counted after the OS lock was taken: that
    promised the holder time it did not have (the chaos history checker caught a takeover
    ~0.1 ms before the reported expiry). Checked on the one-step path and the waiting path."""
    backend = FileBackend(tmp_path / "locks")
    locks = KeyedLock(backend)
    local = backend._shared.local
    lease = await locks.acquire("exp", ttl=5)  # one step: free key
    assert lease.expires_at is not None
    assert lease.expires_at <= local._entries["exp"][1]
    waiter = asyncio.create_task(locks.acquire("exp", ttl=5))  # waits, then takes it on
    await asyncio.sleep(0.01)
    await lease.release()
    second = await waiter
    assert second.expires_at is not None
    assert second.expires_at <= local._entries["exp"][1]
    await second.release()
    lease = locks.acquire_sync("exp", ttl=5)
    assert lease.expires_at is not None
    assert lease.expires_at <= local._entries["exp"][1]
    lease.release_sync()
    locks.close_sync()
