"""RedisBackend's arguments, its messages, and the operator's force-release."""

from __future__ import annotations

import math
import threading
import time

import pytest
import redis

from keylock import BackendUnavailable, KeyedLock
from keylock._inspect import force_release_redis, inspect_redis
from keylock.backends import RedisBackend

from .._redis_server import Server

SECRET = "S3cr3tPassw0rd"


@pytest.fixture
def url(redis_server: Server) -> str:
    redis_server.flush()
    return redis_server.url


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"ttl": math.inf}, ValueError),
        ({"ttl": math.nan}, ValueError),
        ({"ttl": 0}, ValueError),
        ({"ttl": -1}, ValueError),
        ({"ttl": 1e300}, ValueError),
        ({"ttl": "30"}, TypeError),
        ({"ttl": True}, TypeError),
        ({"poll": math.nan}, ValueError),
        ({"poll": -1}, ValueError),
        ({"poll": math.inf}, ValueError),
        ({"poll": "1"}, TypeError),
        ({"prefix": ""}, ValueError),
        ({"prefix": "a{b}"}, ValueError),
        ({"prefix": 5}, TypeError),
    ],
)
def test_bad_arguments_fail_at_construction(options: dict[str, object], error: type) -> None:
    """Rows 37 (adv_06) and 38 (adv_31): each bad number or prefix is a TypeError/ValueError
    from the constructor. Fails before the fix for ttl=inf/1e300/True, poll=-1/inf/'1' and
    the prefixes: accepted, they failed later (an OverflowError, a server error blaming Redis,
    keys of every lock in one Cluster slot)."""
    with pytest.raises(error):
        RedisBackend(redis.Redis(), **options)  # type: ignore[arg-type]


def test_a_url_or_an_async_client_in_the_wrong_place_is_a_type_error() -> None:
    """Row 38 (adv_31): ``RedisBackend("redis://…")`` was accepted, then crashed the listener."""
    with pytest.raises(TypeError, match="from_url"):
        RedisBackend("redis://127.0.0.1:6379")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async_client"):
        RedisBackend(async_client=redis.Redis())  # type: ignore[arg-type]


def test_an_unknown_client_option_fails_at_construction(url: str) -> None:
    """Row 37 (adv_06): ``from_url(url, replica=1)`` names the option at once. Fails before
    the fix: accepted, then a TypeError deep in redis-py at the first command. (The row's
    ``replicas=1`` is a real option now: see test_redis_replicas.py.)"""
    with pytest.raises(TypeError, match="replica"):
        RedisBackend.from_url(url, replica=1)
    RedisBackend.from_url(url, socket_timeout=2, health_check_interval=5).close_sync()


def test_a_ttl_past_what_redis_counts_is_a_value_error(url: str) -> None:
    """Row 37 (adv_06): a per-call TTL Redis cannot store is a ValueError, not a server error."""
    locks = KeyedLock(RedisBackend.from_url(url))
    with pytest.raises(ValueError, match="TTL"):
        locks.acquire_sync("k", ttl=1e16, timeout=1)
    assert len(locks.backend._tier.local) == 0  # type: ignore[attr-defined]
    locks.close_sync()


@pytest.mark.parametrize(
    "bad_url",
    [
        f"redis://app:{SECRET}@127.0.0.1:notaport/0",
        f"redis://app:{SECRET}@127.0.0.1:99999/0",
        f"redis://:{SECRET}@127.0.0.1:1/0",
    ],
)
def test_no_password_in_any_message(bad_url: str) -> None:
    """Row 21 (adv_03): no password in an error message, its cause, or a repr. Fails before
    the fix: the full URL with the password was in the BackendUnavailable message."""
    shown: list[str] = []

    def connect_and_acquire() -> None:  # fails at construction, or at the first call
        backend = RedisBackend.from_url(bad_url)
        shown.append(repr(backend))
        try:
            KeyedLock(backend).acquire_sync("k", timeout=0)
        finally:
            backend.close_sync()

    # a URL that cannot be read is bad input (ValueError); an unreachable server an outage
    expected = BackendUnavailable if bad_url.endswith("@127.0.0.1:1/0") else ValueError
    with pytest.raises(expected) as info:
        connect_and_acquire()
    shown += [str(info.value), repr(info.value), str(info.value.__cause__)]
    assert not [text for text in shown if SECRET in text]


def test_an_unreachable_cluster_is_backend_unavailable() -> None:
    """Row 21 (adv_03): RedisClusterException is not a RedisError; it used to escape raw."""
    with pytest.raises(BackendUnavailable) as info:
        RedisBackend.from_url(f"redis://app:{SECRET}@127.0.0.1:1/0", cluster=True)
    assert SECRET not in str(info.value)


def test_force_release_deletes_only_the_owner_shown_and_wakes_the_next_waiter(url: str) -> None:
    """Row 24 (adv_26): force-release compares the owner an operator was shown (a lease taken
    since is left alone) and hands the key to the queued waiter at once, well under its 30 s
    poll. Fails before the fix: no owner check (the call takes no owner), and the wake-up went
    to a channel nobody listens to, so the waiter slept out its poll."""
    holder = KeyedLock(RedisBackend.from_url(url))
    waiter = KeyedLock(RedisBackend.from_url(url, poll=30.0))
    lease = holder.acquire_sync("stuck")
    (shown,) = [held for held in inspect_redis(url) if held.key == "stuck"]
    assert shown.owner == lease.owner.hex()
    assert not force_release_redis(url, "stuck", owner="ab" * 16)  # not the holder: no-op
    assert not lease.lost
    got: list[float] = []

    def wait() -> None:
        start = time.monotonic()
        waiter.acquire_sync("stuck", timeout=10).release_sync()
        got.append(time.monotonic() - start)

    thread = threading.Thread(target=wait)
    thread.start()
    raw = redis.Redis.from_url(url)
    while not raw.zcard(holder.backend.layout.lock("stuck")[2]):  # type: ignore[attr-defined]
        time.sleep(0.002)
    started = time.monotonic()
    assert force_release_redis(url, "stuck", owner=shown.owner)
    thread.join(10)
    assert got
    assert time.monotonic() - started < 2
    holder.close_sync()
    waiter.close_sync()
