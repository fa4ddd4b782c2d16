"""RedisBackend's permit views, beyond the conformance suite: hand-offs by pub/sub (several
waiters of one process, each woken), the one shared renewer keeping permits and locks alive,
loss signalling, took_over through a hand-off, the view's lifetime and a forked child."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import types

import pytest
import redis

from keylock import KeyedLock, KeyedRWLock, KeyedSemaphore, LeaseLost, LimitMismatch
from keylock.backends import RedisBackend
from keylock.backends.base import RW_LIMIT
from keylock.backends.redis import _listener
from keylock.backends.redis._flow import ServerClock
from keylock.backends.redis._listener import HandOff, Waiting
from keylock.backends.redis._permits import RedisPermits

from .._redis_server import Server


@pytest.fixture
def url(redis_server: Server) -> str:
    redis_server.flush()
    return redis_server.url


def _renewers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "keylock-redis-renewer"]


async def test_a_release_wakes_every_reader_of_one_process_it_hands_off_to(url: str) -> None:
    """A writer's release hands a permit to each of three readers of another process in one
    script: one message each, so each wakes at once (poll=60: no polling could do it)."""
    writer_backend = RedisBackend.from_url(url, poll=60)
    reader_backend = RedisBackend.from_url(url, poll=60)
    writes, reads = KeyedRWLock(writer_backend), KeyedRWLock(reader_backend)
    writer = await writes.acquire_write("doc")
    readers = [asyncio.ensure_future(reads.acquire_read("doc", timeout=30)) for _ in range(3)]
    deadline = time.monotonic() + 10
    while reads.reader.statistics("doc").waiting < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
    released = time.monotonic()
    await writer.release()
    granted = await asyncio.wait_for(asyncio.gather(*readers), 5)
    assert time.monotonic() - released < 1.0  # woken by the hand-offs, not the 60 s poll
    tokens = [lease.token for lease in granted]
    assert len(set(tokens)) == 3
    assert min(tokens) > writer.token
    assert reads.reader.statistics("doc").holders == 3
    for lease in granted:
        await lease.release()
    await writer_backend.close()
    await reader_backend.close()


def test_sync_waiters_of_one_process_are_each_woken_by_a_hand_off(url: str) -> None:
    holder_backend = RedisBackend.from_url(url, poll=60)
    waiter_backend = RedisBackend.from_url(url, poll=60)
    held = KeyedSemaphore(holder_backend, limit=2)
    waiting = KeyedSemaphore(waiter_backend, limit=2)
    first, second = held.acquire_sync("api"), held.acquire_sync("api")
    got: list[float] = []

    def wait() -> None:
        lease = waiting.acquire_sync("api", timeout=30)
        got.append(time.monotonic())
        lease.release_sync()

    threads = [threading.Thread(target=wait) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while waiting.statistics("api").waiting < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    released = time.monotonic()
    first.release_sync()
    second.release_sync()
    for thread in threads:
        thread.join(10)
    assert len(got) == 2
    assert max(got) - released < 1.0
    holder_backend.close_sync()
    waiter_backend.close_sync()


def test_the_parent_renewer_keeps_permits_and_locks_alive(url: str) -> None:
    """One renewer thread for the backend, renewing a lock and two permits in its rounds
    (each kind with its own script): all outlive their 0.6 s TTL many times over."""
    before = len(_renewers())
    backend = RedisBackend.from_url(url, ttl=0.6)
    lock = KeyedLock(backend).acquire_sync("job")
    sem = KeyedSemaphore(backend, limit=2)
    permits = [sem.acquire_sync("api"), sem.acquire_sync("api")]
    assert len(_renewers()) == before + 1
    assert "_renewer" not in backend.permits(2).__dict__  # the view has none of its own
    time.sleep(2.0)  # over 3 TTLs: only renewals keep them
    assert not lock.lost
    assert not any(permit.lost for permit in permits)
    other = RedisBackend.from_url(url)
    with pytest.raises(Exception, match="not granted"):
        KeyedSemaphore(other, limit=2).acquire_sync("api", timeout=0)
    other.close_sync()
    for permit in permits:
        permit.release_sync()
    lock.release_sync()
    backend.close_sync()
    assert len(_renewers()) == before


def test_a_permit_found_gone_is_reported_lost(url: str) -> None:
    """The renewal finds the permit gone (its holder entry deleted behind its back): lost
    turns true, on_lost runs, and its release is LeaseLost."""
    seen: list[object] = []
    backend = RedisBackend.from_url(url, ttl=0.6)
    sem = KeyedSemaphore(backend, limit=3, on_lost=seen.append)
    lease = sem.acquire_sync("api")
    record = backend.layout.permit_extend("api")[0]
    client = redis.Redis.from_url(url)
    # the lone holder of an uncontended grant keeps its expiry in the record (see _permit_fast)
    assert client.hget(record, "solo") == lease._owner
    assert client.hdel(record, "solo", "solo_expires") == 2
    deadline = time.monotonic() + 5
    while not (lease.lost and seen):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(LeaseLost):
        lease.release_sync()
    assert lease._owner not in backend._permit_owners  # never renewed again
    client.close()
    backend.close_sync()


def test_without_auto_renew_a_permit_lapses_and_is_taken_over(url: str) -> None:
    holder_backend = RedisBackend.from_url(url, auto_renew=False)
    waiter_backend = RedisBackend.from_url(url, auto_renew=False, poll=60)
    frozen = KeyedSemaphore(holder_backend, limit=1).acquire_sync("job", ttl=0.3)
    waiting = KeyedSemaphore(waiter_backend, limit=1)
    lease = waiting.acquire_sync("job", timeout=10)
    assert lease.took_over
    assert lease.token > frozen.token
    with pytest.raises(LeaseLost):
        frozen.release_sync()
    lease.release_sync()
    again = waiting.acquire_sync("job", timeout=0)
    assert not again.took_over
    again.release_sync()
    holder_backend.close_sync()
    waiter_backend.close_sync()


async def test_a_limit_mismatch_sends_nothing_more(url: str) -> None:
    """LimitMismatch is the whole answer: no LEAVE follows it (nothing was queued)."""
    holder = RedisBackend.from_url(url)
    lease = await KeyedSemaphore(holder, limit=2).acquire("k")
    backend = RedisBackend.from_url(url)  # another process: Redis, not its tier, refuses
    calls: list[str] = []
    run = backend._connections.run

    async def counted(script: object, *args: object) -> object:
        calls.append(script.name)  # type: ignore[attr-defined]
        return await run(script, *args)  # type: ignore[arg-type]

    backend._connections.run = counted  # type: ignore[method-assign]
    with pytest.raises(LimitMismatch):
        await KeyedSemaphore(backend, limit=3).acquire("k", timeout=5)
    await asyncio.sleep(0.3)  # (a LEAVE would be sent at once, waited for 0.25 s at most)
    assert calls == ["permit_acquire"]
    await lease.release()
    await holder.close()
    await backend.close()


def test_views_are_cached_share_the_parent_and_close_nothing(url: str) -> None:
    backend = RedisBackend.from_url(url)
    view = backend.permits(4)
    assert view is backend.permits(4, 1)
    assert isinstance(view, RedisPermits)
    assert backend.permits(RW_LIMIT, RW_LIMIT) is not view
    assert repr(view) == f"{backend!r}.permits(4, 1)"
    view.close_sync()  # nothing: the parent still works
    lease = KeyedSemaphore(backend, limit=4).acquire_sync("x")
    lease.release_sync()
    with pytest.raises(TypeError, match="already a permit view"):
        view.permits(2)
    with pytest.raises(ValueError, match="weight 5 exceeds limit 4"):
        backend.permits(4, 5)
    backend.close_sync()


def test_a_lock_and_a_semaphore_of_one_name_do_not_meet(url: str) -> None:
    backend = RedisBackend.from_url(url)
    lock = KeyedLock(backend).acquire_sync("same")
    permit = KeyedSemaphore(backend, limit=1).acquire_sync("same", timeout=0)
    permit.release_sync()
    lock.release_sync()
    backend.close_sync()


def test_a_forked_child_holds_none_of_its_parents_permits(url: str) -> None:
    backend = RedisBackend.from_url(url)
    sem = KeyedSemaphore(backend, limit=2)
    lease = sem.acquire_sync("api")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own tier, threads and connections; the parent's permit counts
        try:
            child = sem.acquire_sync("api", timeout=5)
            full = False
            try:
                sem.acquire_sync("api", timeout=0)
            except Exception:
                full = True
            child.release_sync()
            os.write(write, b"ok" if full and not backend._permit_owners else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 2) == b"ok"
    os.waitpid(pid, 0)
    lease.release_sync()
    backend.close_sync()


def test_inspect_lists_permit_keys_beside_locks(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from keylock._inspect import inspect_redis
    from keylock.cli import main

    backend = RedisBackend.from_url(url)
    lock = KeyedLock(backend, namespace="app").acquire_sync("job")
    sem = KeyedSemaphore(backend, limit=4, namespace="app")
    permits = [sem.acquire_sync("api"), sem.acquire_sync("api")]
    reader = KeyedRWLock(backend, namespace="app").acquire_read_sync("doc")
    found = {(held.key, held.permits): held for held in inspect_redis(url)}
    assert set(found) == {("app:job", None), ("app:api", (2, 4)), ("app:doc", (1, RW_LIMIT))}
    newest = found[("app:api", (2, 4))]
    assert newest.token == permits[1].token
    assert newest.owner == permits[1].owner.hex()
    assert newest.ttl is not None
    assert 20 < newest.ttl <= 30
    # a lone holder (kept in the key's record, no holders zset): its TTL too, not '-' (the
    # old inspect read the holders zset only)
    lone = found[("app:doc", (1, RW_LIMIT))].ttl
    assert lone is not None
    assert 20 < lone <= 30
    assert main(["inspect", "--redis-url", url]) == 0
    out = capsys.readouterr().out
    assert "2 permits of limit 4; newest: owner" in out
    assert "1 permit of an RW lock; newest: owner" in out
    assert "3 held" in out
    for lease in (lock, *permits, reader):
        lease.release_sync()
    assert list(inspect_redis(url)) == []
    backend.close_sync()


def test_a_hand_off_dated_across_a_stall_never_outlives_its_wall_clock_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The listener dates a hand-off with two clock readings, wall (its expiry) and monotonic
    (its claim window's end, which decides whether the waiter adopts it without asking).
    Here the listener thread stalls 0.1 s between them (on a loaded host: waiting for the
    GIL, or descheduled): the window's end must not move past the expiry. Fails before: the
    monotonic reading came second, so the stall moved the window's end 0.1 s late, and a
    waiter could adopt a permit that the server had already given away."""
    offset = 1e9  # wall clock - monotonic clock

    class Stalling:
        """A clock that stalls 0.1 s after its first reading (of either kind)."""

        def __init__(self) -> None:
            self.at = 1000.0
            self.read = False

        def _tick(self) -> float:
            at = self.at
            if not self.read:
                self.read, self.at = True, at + 0.1
            return at

        def monotonic(self) -> float:
            return self._tick()

        def time(self) -> float:
            return self._tick() + offset

    clock = ServerClock()
    clock.reading = (0.0, 0.0005)  # the server's clock is ours, to 0.5 ms
    waiting = Waiting(lambda: None, "wake", clock, "test")  # type: ignore[arg-type,return-value]
    owner = b"\x01" * 16
    flow = types.SimpleNamespace(handed=None)
    woken: list[bool] = []
    waiter = types.SimpleNamespace(wake=lambda: woken.append(True))
    waiting.waiters["api"] = {owner: (flow, waiter)}  # type: ignore[dict-item]
    granted_us = str(int((1000.0 + offset - 0.02) * 1e6)).encode()  # 20 ms before
    monkeypatch.setattr(_listener, "time", Stalling())
    waiting.deliver(HandOff("api", owner, 7, granted_us, 0.08))
    handed = flow.handed
    assert woken == [True]
    assert handed.token == 7
    assert handed.expires_at < 1000.0 + offset + 0.06  # the 80 ms window, granted 20 ms ago
    assert handed.deadline <= handed.expires_at - offset  # not a moment past it
