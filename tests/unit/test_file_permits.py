"""FileBackend permits at the file level: the shapes it keeps, the path rules of lock files
(symlinks and planted files refused, nothing written through them), waiting woken by the
kernel (no polling), a forked child holding nothing, and nothing left open after a wait."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from keylock import BackendUnavailable, KeyedLock, LeaseLost, LockTimeout
from keylock.backends import FileBackend
from keylock.backends._filepermits import MAX_SLOTS, Claim
from keylock.backends.base import RW_LIMIT
from keylock.backends.file import file_name

from .._poll import until

ctx = multiprocessing.get_context("fork")


def _base(key: str) -> str:
    return file_name(key)[: -len(".lock")]


def test_shapes_the_file_backend_cannot_keep_are_refused(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path)
    assert backend.permits(MAX_SLOTS) is backend.permits(MAX_SLOTS)
    with pytest.raises(ValueError, match=f"limit {MAX_SLOTS + 1} is over {MAX_SLOTS}"):
        backend.permits(MAX_SLOTS + 1)
    with pytest.raises(ValueError, match="1 \\(read\\) or RW_LIMIT"):
        backend.permits(RW_LIMIT, 2)
    with pytest.raises(ValueError, match="positive int"):
        backend.permits(0)


@pytest.mark.parametrize(
    ("suffix", "limit"), [(".slot0", 2), (".gate", 2), (".join", 2), (".rw", RW_LIMIT)]
)
def test_a_planted_symlink_is_refused_and_its_target_untouched(
    tmp_path: Path, suffix: str, limit: int
) -> None:
    """A symlink at any permit file's path: acquire raises BackendUnavailable naming the key,
    and the file it points at is neither written nor truncated (filelock CVE-2025-68146)."""
    directory = tmp_path / "locks"
    backend = FileBackend(directory)
    target = tmp_path / "precious"
    target.write_text("keep me")
    os.symlink(target, directory / (_base("k") + suffix))
    locks = KeyedLock(backend.permits(limit))
    with pytest.raises(BackendUnavailable, match="symlink") as raised:
        locks.acquire_sync("k", timeout=0)
    assert raised.value.key == "k"
    assert target.read_text() == "keep me"
    assert not backend._shared.fds  # nothing left open


def test_a_planted_hard_link_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "locks"
    backend = FileBackend(directory)
    target = tmp_path / "precious"
    target.write_text("keep me")
    os.link(target, directory / (_base("k") + ".rw"))
    with pytest.raises(BackendUnavailable, match="hard links"):
        KeyedLock(backend.permits(RW_LIMIT)).acquire_sync("k", timeout=0)
    assert target.read_text() == "keep me"


def _hold(directory: str, key: str, ready: object, go: object) -> None:
    lease = KeyedLock(FileBackend(directory).permits(1)).acquire_sync(key)
    ready.set()  # type: ignore[attr-defined]
    go.wait(60)  # type: ignore[attr-defined]
    lease.release_sync()


def test_a_waiter_sleeps_in_flock_and_is_woken_by_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter whose permit another process holds makes a couple of steps (gate, then one
    blocking step on the slot), not one per poll, however long it waits; the holder's
    release wakes it at once."""
    directory = str(tmp_path)
    ready, go = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(directory, "k", ready, go))
    holder.start()
    assert ready.wait(30)
    steps = [0]
    step = Claim.step

    def counted(self: Claim, **kwargs: bool) -> object:
        steps[0] += 1
        return step(self, **kwargs)

    monkeypatch.setattr(Claim, "step", counted)
    backend = FileBackend(directory)
    got: list[object] = []
    waiter = threading.Thread(
        target=lambda: got.append(KeyedLock(backend.permits(1)).acquire_sync("k", timeout=60))
    )
    waiter.start()
    until(lambda: steps[0] >= 1 and not got, "the waiter's first step")
    threading.Event().wait(0.3)  # an observation window: a polling waiter steps ~100 times
    assert steps[0] <= 2, f"{steps[0]} steps while another process held the permit: polling"
    go.set()
    waiter.join(30)
    assert got
    assert steps[0] <= 3
    got[0].release_sync()  # type: ignore[attr-defined]
    holder.join(10)
    assert not backend._shared.fds


def _in_child(directory: str, lease: object, results: object) -> None:
    outcome = []
    try:
        lease.release_sync()  # type: ignore[attr-defined]
        outcome.append("released")
    except LeaseLost:
        outcome.append("LeaseLost")
    try:
        KeyedLock(FileBackend(directory).permits(1)).acquire_sync("forked", timeout=0)
        outcome.append("acquired")
    except LockTimeout:
        outcome.append("LockTimeout")
    results.put(outcome)  # type: ignore[attr-defined]


def test_a_forked_child_neither_releases_nor_inherits_the_parents_permit(tmp_path: Path) -> None:
    directory = str(tmp_path)
    lease = KeyedLock(FileBackend(directory).permits(1)).acquire_sync("forked")
    results = ctx.Queue()
    child = ctx.Process(target=_in_child, args=(directory, lease, results))
    child.start()
    assert results.get(timeout=30) == ["LeaseLost", "LockTimeout"]
    child.join(10)
    lease.release_sync()


def test_a_lapsed_permit_is_let_go_unreleased_for_the_next_holder(tmp_path: Path) -> None:
    """A permit whose TTL ran out here: the next caller here takes it over, the old one's
    release raises LeaseLost, and its slot is not kept by this process (after the new one's
    release the key is free for anyone: an exclusive writer gets all of it at once)."""
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend.permits(2), on_lost=lambda lease: None)
    old = [locks.acquire_sync("k", ttl=0.05) for _ in range(2)]
    until(lambda: all(lease.lost for lease in old), "the permits lapse")
    new = locks.acquire_sync("k", timeout=5)
    assert new.took_over
    for lease in old:
        with pytest.raises(LeaseLost):
            lease.release_sync()
    new.release_sync()
    KeyedLock(backend.permits(2, 2)).acquire_sync("k", timeout=0).release_sync()
    assert not backend._shared.fds


def test_a_permit_is_released_after_its_backend_closed(tmp_path: Path) -> None:
    """As a lock is: closing the backend (its directory's descriptor) does not keep a held
    permit from being released; the fairness hint that needs the directory is skipped.
    (Before, the release raised BackendUnavailable from that hint.)"""
    backend = FileBackend(tmp_path)
    lease = KeyedLock(backend.permits(1)).acquire_sync("k")
    backend.close_sync()
    lease.release_sync()
    KeyedLock(FileBackend(tmp_path).permits(1)).acquire_sync("k", timeout=0).release_sync()
    assert not backend._shared.fds


def test_prune_removes_the_permit_files_of_keys_nobody_uses(tmp_path: Path) -> None:
    """Semaphore and RW keys used once, a key whose holder is still here, and a waiter's
    ticket left by a dead process: prune removes every permit file of the unused keys (and
    the dead ticket), keeps the held key's, and the pruned keys work again afterwards, with
    tokens still rising. (Before, permit files were never pruned: 0 removed.)"""
    backend = FileBackend(tmp_path)
    sem, rw = KeyedLock(backend.permits(4)), KeyedLock(backend.permits(RW_LIMIT, RW_LIMIT))
    tokens = []
    for key in ("a", "b"):
        lease = sem.acquire_sync(key, timeout=0)
        tokens.append(lease.token)
        lease.release_sync()
    rw.acquire_sync("doc", timeout=0).release_sync()
    held = sem.acquire_sync("held", timeout=0)
    (tmp_path / (_base("a") + ".t7")).write_text("")  # a dead waiter's ticket
    before = set(os.listdir(tmp_path))
    assert backend.prune() >= 8
    left = set(os.listdir(tmp_path))
    assert not [name for name in left if not name.startswith(_base("held"))]
    assert {name for name in before if name.startswith(_base("held"))} == left
    held.release_sync()
    lease = sem.acquire_sync("a", timeout=0)
    assert lease.token > max(tokens)
    lease.release_sync()
    rw.acquire_sync("doc", timeout=0).release_sync()
    assert backend.prune(idle_for=3600) == 0  # (just used)
    assert not backend._shared.fds


def _try_in_child(directory: str, key: str, results: object) -> None:
    try:
        lease = KeyedLock(FileBackend(directory).permits(1)).acquire_sync(key, timeout=10)
    except LockTimeout:
        results.put("LockTimeout")  # type: ignore[attr-defined]
    else:
        lease.release_sync()
        results.put("granted")  # type: ignore[attr-defined]


def _tickets(directory: Path, key: str) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(_base(key) + ".t")]


def test_a_waiter_whose_loop_closed_leaves_the_line(tmp_path: Path) -> None:
    """A waiter whose event loop closed without cancelling it (a shutdown that did not wait
    for its tasks) is found out when the permit it waited for frees up: it leaves the line,
    ticket included, so the next process's claim is served. Fails on the old code: the pool
    thread let the slot go but the claim kept its ticket locked, and every later claim of the
    key, in any process, waited behind it until this process exited (LockTimeout); and its
    turn in this process's own line was never passed on."""
    ready, go = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), "k", ready, go))
    holder.start()
    assert ready.wait(30)
    backend = FileBackend(tmp_path)
    loop = asyncio.new_event_loop()
    try:
        waiting = loop.create_task(KeyedLock(backend.permits(1)).acquire("k", timeout=60))

        async def until_in_line() -> None:
            for _ in range(5000):  # bounded: until the waiter took its ticket
                if _tickets(tmp_path, "k"):
                    return
                await asyncio.sleep(0.002)
            raise AssertionError("the waiter never took a ticket")

        loop.run_until_complete(until_in_line())
        assert not waiting.done()
    finally:
        loop.close()  # (its waiting task is not cancelled: it never runs again)
    go.set()
    holder.join(30)
    results = ctx.Queue()
    other = ctx.Process(target=_try_in_child, args=(str(tmp_path), "k", results))
    other.start()
    assert results.get(timeout=30) == "granted"
    other.join(10)
    until(lambda: not _tickets(tmp_path, "k"), "the closed loop's ticket gone")
    # and its turn in this process's line went to the next caller here
    KeyedLock(FileBackend(tmp_path).permits(1)).acquire_sync("k", timeout=10).release_sync()
