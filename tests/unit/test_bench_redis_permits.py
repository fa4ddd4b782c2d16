"""The Redis semaphore bench suite: its rows, its peer, and that it leaves nothing behind."""

from __future__ import annotations

import contextlib
import threading

import pytest
import redis

from keylock._bench import redis as redis_suite
from keylock._bench import redis_permits
from keylock._bench.harness import Suite

from .._redis_server import Server


def test_the_full_run_measures_keylock_and_the_zset_recipe_with_0_violations(
    redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_server.flush()
    monkeypatch.setattr(redis_permits, "WORKERS", 6)  # (the shape of the run, in seconds)
    suite = Suite(mode="quick", progress=False)
    with contextlib.ExitStack() as stack:
        steps = redis_suite.steps(suite, stack, redis_url=redis_server.url)
        mine = [step for step in steps if "semaphore" in step.label]
        assert [step.label for step in mine] == [
            "redis: uncontended semaphore acquire+release",
            "redis, processes: semaphore limit 4, 6 processes",
        ]
        for step in mine:
            step.run()
    rows = {(row.workload, row.subject): row for row in suite.rows}
    pings = "redis: uncontended semaphore acquire+release"
    assert {subject for workload, subject in rows if workload == pings} == {
        "PING round trip",
        "keylock KeyedSemaphore (sync)",
        "keylock KeyedSemaphore (async)",
        "hand-rolled ZSET semaphore",
    }
    contended = "redis, processes: semaphore limit 4, one key"
    keylock = rows[(contended, "keylock KeyedSemaphore (sync)")]
    assert keylock.median > 0
    assert keylock.extra["violations"] == 0
    assert (contended, "hand-rolled ZSET semaphore") in rows
    client = redis.Redis.from_url(redis_server.url)
    assert all(client.ttl(name) != -1 for name in client.scan_iter(count=1_000))  # all expire
    client.close()


def test_the_zset_recipe_admits_at_most_its_limit_when_clients_take_turns(
    redis_server: Server,
) -> None:
    """The peer works as the recipe says when calls do not race (its known race, a later
    ZADD with an earlier timestamp, shows as violations in the contended rows)."""
    redis_server.flush()
    client = redis.Redis.from_url(redis_server.url)
    sem = redis_permits.ZsetSemaphore(client, "zs", 2)
    first, second = sem.try_acquire(), sem.try_acquire()
    assert first is not None
    assert second is not None
    assert sem.try_acquire() is None
    client.zrem("zs", first)
    assert sem.try_acquire() is not None
    done = threading.Event()

    def hold() -> None:
        with sem.hold():
            done.set()

    client.delete("zs")
    thread = threading.Thread(target=hold)
    thread.start()
    thread.join(5)
    assert done.is_set()
    client.close()
