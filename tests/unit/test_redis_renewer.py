"""The Redis renewer: keeps leases alive at scale, follows extend(), and survives user code."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from keylock import KeyedLock, LockTimeout, Observer
from keylock.backends import RedisBackend

from .._redis_server import Server
from ..chaos._proxy import Proxy


@pytest.fixture
def url(redis_server: Server) -> str:
    redis_server.flush()
    return redis_server.url


def _held_elsewhere(url: str, key: str) -> bool:
    """True if another client cannot take *key* now."""
    other = KeyedLock(RedisBackend.from_url(url))
    try:
        other.acquire_sync(key, timeout=0).release_sync()
    except LockTimeout:
        return True
    finally:
        other.close_sync()
    return False


class _RaisesOnce(Observer):
    def __init__(self) -> None:
        self.raised = threading.Event()

    def renewed(self, prefix: str) -> None:
        if not self.raised.is_set():
            self.raised.set()
            raise RuntimeError("metrics backend down")


def test_an_observer_that_raises_does_not_stop_renewals(url: str) -> None:
    """Row 4 (adv_11): an Observer.renewed that raises once must not kill the renewer. Fails
    before the fix: the exception ended the renewer thread, the lease lapsed at its 0.6 s TTL
    and another client took the key."""
    observer = _RaisesOnce()
    locks = KeyedLock(RedisBackend.from_url(url, ttl=0.6), observer=observer)
    lease = locks.acquire_sync("metrics")
    deadline = time.monotonic() + 5
    while not observer.raised.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert observer.raised.is_set()
    time.sleep(1.5)  # 2.5 TTLs after the raise: only further renewals keep the lease
    assert not lease.lost
    assert _held_elsewhere(url, "metrics")
    lease.release_sync()
    locks.close_sync()


def test_a_blocking_on_lost_does_not_starve_other_leases(url: str) -> None:
    """Row 5 (adv_12): on_lost of one lease blocks for seconds; another lease of the same
    backend keeps renewing meanwhile. Fails before the fix: on_lost ran on the renewer thread,
    so the healthy 0.6 s lease lapsed and another client took it."""
    release_callback = threading.Event()
    called = threading.Event()

    def on_lost(lease: object) -> None:
        called.set()
        release_callback.wait(5)  # a slow alerting call

    locks = KeyedLock(RedisBackend.from_url(url, ttl=0.6), on_lost=on_lost)
    doomed = locks.acquire_sync("doomed")
    healthy = locks.acquire_sync("healthy")
    redis.Redis.from_url(url).delete(locks.backend.layout.lock("doomed")[0])  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while not called.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert called.is_set()
    try:
        time.sleep(1.5)  # 2.5 TTLs of the healthy lease while on_lost still blocks
        assert not healthy.lost
        assert _held_elsewhere(url, "healthy")
    finally:
        release_callback.set()
    assert doomed.lost
    healthy.release_sync()
    locks.close_sync()


def test_auto_renew_follows_a_shorter_extend(url: str) -> None:
    """Row 6 (adv_22): after extend(0.6) on a 30 s lease, the next renewal comes within a
    third of 0.6 s. Fails before the fix: the renewer kept its 10 s schedule, the lease lapsed
    at 0.6 s and another client took the key."""
    locks = KeyedLock(RedisBackend.from_url(url))
    lease = locks.acquire_sync("short", ttl=30)
    lease.extend_sync(0.6)
    time.sleep(1.5)  # 2.5 of the new TTL
    assert not lease.lost
    assert _held_elsewhere(url, "short")
    lease.release_sync()
    locks.close_sync()


def test_a_thousand_leases_at_40ms_rtt_are_all_kept(redis_server: Server) -> None:
    """Row 8 (adv_13): 1,000 leases with a 2 s TTL behind a 40 ms round trip stay held: each
    renewal round is one pipelined batch, not 1,000 round trips. Fails before the fix: one
    round trip per lease made a round take 40 s, and every lease lapsed."""
    redis_server.flush()
    lost: list[str] = []
    with Proxy(redis_server.port) as proxy:
        locks = KeyedLock(
            RedisBackend.from_url(proxy.url, ttl=2.0), on_lost=lambda lease: lost.append(lease.key)
        )
        leases = [locks.acquire_sync(f"job:{n}") for n in range(1000)]  # a fast link first
        proxy.set(up_delay=0.02, down_delay=0.02)
        time.sleep(4.0)  # two TTLs behind the slow link
        assert lost == []
        assert not any(lease.lost for lease in leases)
        raw = redis.Redis.from_url(redis_server.url)
        pipe = raw.pipeline(transaction=False)
        layout = locks.backend.layout  # type: ignore[attr-defined]
        for n in range(1000):
            pipe.pttl(layout.lock(f"job:{n}")[0])
        assert min(pipe.execute()) > 0  # every lease is still on the server
        proxy.set(up_delay=0.0, down_delay=0.0)
        for lease in leases:
            lease.release_sync()
        locks.close_sync()
