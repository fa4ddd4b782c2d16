"""The command line: inspect held locks on Redis and in a lock directory; force-release."""

from __future__ import annotations

import pytest

from keylock import KeyedLock, LeaseLost, LockTimeout
from keylock._inspect import inspect_directory, inspect_redis
from keylock.backends import FileBackend, RedisBackend
from keylock.cli import main

from .._redis_server import Server


def test_inspect_lists_three_held_redis_locks_with_tokens_and_ttls(
    redis_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_server.flush()
    locks = KeyedLock(RedisBackend.from_url(redis_server.url, ttl=30), namespace="app")
    leases = [locks.acquire_sync(f"job:{i}") for i in range(3)]
    held = {lock.key: lock for lock in inspect_redis(redis_server.url)}
    assert set(held) == {"app:job:0", "app:job:1", "app:job:2"}
    for lease in leases:
        found = held[f"app:{lease.key}"]
        assert found.token == lease.token
        assert found.owner == lease.owner.hex()
        assert found.ttl is not None
        assert 20 < found.ttl <= 30
    assert main(["inspect", "--redis-url", redis_server.url]) == 0
    out = capsys.readouterr().out
    assert "3 held" in out
    assert str(leases[0].token) in out
    for lease in leases:
        lease.release_sync()
    assert list(inspect_redis(redis_server.url)) == []
    locks.close_sync()


def test_force_release_frees_a_redis_lock(
    redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_server.flush()
    locks = KeyedLock(RedisBackend.from_url(redis_server.url))
    lease = locks.acquire_sync("stuck")
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["release", "stuck", "--force", "--redis-url", redis_server.url]) == 1
    with pytest.raises(LockTimeout):
        KeyedLock(RedisBackend.from_url(redis_server.url)).acquire_sync("stuck", timeout=0)
    assert main(["release", "stuck", "--force", "--yes", "--redis-url", redis_server.url]) == 0
    other = KeyedLock(RedisBackend.from_url(redis_server.url))
    other.acquire_sync("stuck", timeout=0).release_sync()
    with pytest.raises(LeaseLost):  # the broken holder learns it on release
        lease.release_sync()
    other.close_sync()
    locks.close_sync()


def test_inspect_a_lock_directory(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    directory = str(tmp_path)
    locks = KeyedLock(FileBackend(directory))
    lease = locks.acquire_sync("held", ttl=60)
    with locks.sync("free"):
        pass
    held = list(inspect_directory(directory))
    assert [h.token for h in held] == [lease.token]
    assert held[0].holder_pid is not None
    assert main(["inspect", "--dir", directory]) == 0
    assert "1 held" in capsys.readouterr().out
    lease.release_sync()
