"""Fencing helpers: the store rejects stale tokens, atomically, on Redis and in SQL."""

from __future__ import annotations

import sqlite3

import pytest
import redis

from keylock import StaleToken
from keylock.fencing import fenced_get_sync, fenced_set, fenced_set_sync, fenced_update

from .._redis_server import Cluster, Server


@pytest.fixture
def client(redis_server: Server) -> redis.Redis:
    redis_server.flush()
    return redis.Redis.from_url(redis_server.url)


def test_redis_fence_accepts_equal_or_newer_and_rejects_older(client: redis.Redis) -> None:
    fenced_set_sync(client, "invoice:7", 10, "first")
    fenced_set_sync(client, "invoice:7", 10, "again, same lease")
    fenced_set_sync(client, "invoice:7", 12, "newer holder")
    with pytest.raises(StaleToken) as info:
        fenced_set_sync(client, "invoice:7", 11, "stale writer")
    assert info.value.key == "invoice:7"
    assert "12" in str(info.value)
    assert fenced_get_sync(client, "invoice:7") == (b"newer holder", 12)  # nothing changed


async def test_redis_fence_async_twin(redis_server: Server) -> None:
    import redis.asyncio

    redis_server.flush()
    client = redis.asyncio.Redis.from_url(redis_server.url)
    await fenced_set(client, "r", 5, "v5")
    with pytest.raises(StaleToken):
        await fenced_set(client, "r", 4, "v4")
    assert await client.get("keylock:fenced:{r}") == b"v5"
    await client.aclose()


def test_sql_fence_pattern_with_sqlite() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT, fence INTEGER)")
    db.execute("INSERT INTO jobs VALUES (1, 'queued', 0)")
    fenced_update(db, "jobs", 1, 100, {"status": "running"})
    fenced_update(db, "jobs", 1, 205, {"status": "done"})
    with pytest.raises(StaleToken):
        fenced_update(db, "jobs", 1, 150, {"status": "cancelled"})  # the stale worker
    with pytest.raises(StaleToken):
        fenced_update(db, "jobs", 2, 999, {"status": "x"})  # no such row
    assert db.execute("SELECT status, fence FROM jobs WHERE id = 1").fetchone() == ("done", 205)
    with pytest.raises(ValueError, match="identifier"):
        fenced_update(db, "jobs; DROP TABLE jobs", 1, 300, {"status": "x"})


async def test_fenced_get_async_twin(redis_server: Server) -> None:
    import redis.asyncio

    from keylock.fencing import fenced_get

    redis_server.flush()
    client = redis.asyncio.Redis.from_url(redis_server.url)
    assert await fenced_get(client, "g") == (None, None)
    await fenced_set(client, "g", 7, "seven")
    assert await fenced_get(client, "g") == (b"seven", 7)
    await client.aclose()


def test_an_unreachable_store_is_backend_unavailable() -> None:
    from keylock import BackendUnavailable

    from .._redis_server import free_port

    client = redis.Redis(port=free_port())
    with pytest.raises(BackendUnavailable, match="invoice:9") as info:
        fenced_set_sync(client, "invoice:9", 1, "x")
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    with pytest.raises(BackendUnavailable):
        fenced_get_sync(client, "invoice:9")


def test_fenced_writes_on_a_cluster_even_with_braces_in_the_name(redis_cluster: Cluster) -> None:
    """The value and its fence share one hash tag, also for names with braces (a raw
    ``{name}`` tag would split them across slots: CROSSSLOT)."""
    import redis.cluster

    redis_cluster.flush()
    client = redis.cluster.RedisCluster(host=redis_cluster.host, port=redis_cluster.port)
    for name in ("invoice:7", "a}b", "{x}"):
        fenced_set_sync(client, name, 10, "ten")
        with pytest.raises(StaleToken):
            fenced_set_sync(client, name, 9, "nine")
        assert fenced_get_sync(client, name) == (b"ten", 10)  # type: ignore[arg-type]
    client.close()
