"""The Redis key layout and the sans-IO acquire flow: no server needed for most of these."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import pytest
import redis

from keylock import InvalidKey, KeyedLock, LockTimeout, StaleToken
from keylock.backends import RedisBackend
from keylock.backends.redis._flow import AcquireFlow, Handed, ServerClock
from keylock.backends.redis._keys import Layout, tag, untag
from keylock.backends.redis._listener import parse_hand_off
from keylock.fencing import fenced_get_sync, fenced_set_sync

from .._redis_server import Server

BRACED = "user:{42}"
DIGEST = hashlib.sha1(BRACED.encode()).hexdigest()


@pytest.fixture
def url(redis_server: Server) -> str:
    redis_server.flush()
    return redis_server.url


@pytest.mark.parametrize(
    "key", ["user:{42}", DIGEST, "a%7Bb", "a{b", "%", "ns\0job", "ns:job", "\0", "é}{", "%25"]
)
def test_the_tag_is_one_to_one_and_brace_free(key: str) -> None:
    assert untag(tag(key)) == key
    assert not set("{}\0") & set(tag(key))
    assert Layout("keylock").parse(Layout("keylock").lock(key)[0]) == key


def test_distinct_keys_never_share_redis_keys() -> None:
    """Row 10 (adv_01): a braced key and its SHA-1 hex, an encoded-looking key and the key it
    spells, a namespaced key and its ':' lookalike: all apart. Fails before the fix: braced
    keys were tagged with their SHA-1 hex, the very name of another key."""
    layout = Layout("keylock")
    keys = [BRACED, DIGEST, "a%7Bb", "a{b", "ns\0admin:job", "ns:admin\0job", "ns:admin:job"]
    names = {name for key in keys for name in layout.lock(key)}
    assert len(names) == 5 * len(keys)
    fenced = {name for key in keys for name in Layout("keylock:fenced").fenced(key)}
    assert len(fenced) == 2 * len(keys)


def test_a_braced_key_and_its_digest_are_separate_locks(url: str) -> None:
    """Row 10 (adv_01), end to end: holding "user:{42}" does not block its SHA-1 hex, on a
    lock nor in fenced_set. Fails before the fix: one blocked the other, and they shared one
    fenced value and fence."""
    locks = KeyedLock(RedisBackend.from_url(url))
    other = KeyedLock(RedisBackend.from_url(url))
    lease = locks.acquire_sync(BRACED)
    other.acquire_sync(DIGEST, timeout=0).release_sync()
    raw = redis.Redis.from_url(url)
    fenced_set_sync(raw, BRACED, 100, "braced")
    fenced_set_sync(raw, DIGEST, 5, "digest")  # a low token on another resource: accepted
    assert fenced_get_sync(raw, BRACED) == (b"braced", 100)
    assert fenced_get_sync(raw, DIGEST) == (b"digest", 5)
    with pytest.raises(StaleToken):
        fenced_set_sync(raw, BRACED, 99, "late")
    lease.release_sync()
    locks.close_sync()
    other.close_sync()


def test_a_key_with_nul_is_handed_over_by_pub_sub(url: str) -> None:
    """Full keys carry a namespace as ``namespace + NUL + key``: a hand-off of such a key
    reaches its waiter at once. Fails before the fix: the message was split at the key's
    first NUL, the waiter was never found, and it slept out its 30 s poll (timing out at 5 s)."""
    key = "tenant\0admin:job"
    holder = RedisBackend.from_url(url)
    waiter = RedisBackend.from_url(url, poll=30.0)
    grant = holder.acquire_sync(key, b"\1" * 16, timeout=0, ttl=None)
    got: list[float] = []

    def wait() -> None:
        start = time.monotonic()
        handed = waiter.acquire_sync(key, b"\2" * 16, timeout=5, ttl=None)
        got.append(time.monotonic() - start)
        waiter.release_sync(key, b"\2" * 16, handed[0])

    thread = threading.Thread(target=wait)
    thread.start()
    raw = redis.Redis.from_url(url)
    while not raw.zcard(holder.layout.lock(key)[2]):
        time.sleep(0.002)
    holder.release_sync(key, b"\1" * 16, grant[0])
    thread.join(10)
    assert got
    assert got[0] < 2
    holder.close_sync()
    waiter.close_sync()


def test_the_hand_off_message_keeps_the_whole_key() -> None:
    head = b"\0 \x01" + b"h" * 13
    message = b"17 1700000000000000 4000 " + head + b"a\0b c"
    assert parse_hand_off(message) == ("a\0b c", head, 17, b"1700000000000000", 4.0)
    assert parse_hand_off(b"garbage") is None


async def test_a_lone_surrogate_key_is_invalid_key(url: str) -> None:
    """Row 35 (adv_04): a key with a lone surrogate cannot name a Redis key: InvalidKey, and
    nothing is left held. Fails before the fix: a raw UnicodeEncodeError, after the
    in-process turn was taken."""
    key = "file:report-\udcff.csv"
    backend = RedisBackend.from_url(url)
    locks = KeyedLock(backend)
    with pytest.raises(InvalidKey):
        await locks.acquire(key, timeout=1)
    with pytest.raises(InvalidKey):
        locks.acquire_sync(key, timeout=0)
    with pytest.raises(InvalidKey):
        locks.statistics(key)
    with pytest.raises(InvalidKey):
        fenced_set_sync(redis.Redis.from_url(url), key, 1, "v")
    assert len(backend._tier.local) == 0
    async with locks("ok", timeout=1):
        pass
    await locks.close()


def _flow(timeout: float | None = 10.0, now: float = 100.0) -> AcquireFlow:
    return AcquireFlow(
        Layout("keylock"),
        "job",
        b"\1" * 16,
        ttl=30.0,
        timeout=timeout,
        now=now,
        channel="keylock:wake:x",
        stay_ms=4000,
        poll=1.0,
        renewed=True,
    )


def test_a_hand_off_within_its_claim_window_is_adopted_without_a_trip() -> None:
    flow = _flow()
    flow.handed = Handed(7, time.time() + 4.0, 104.0)
    assert flow.next_trip(100.01) is None
    assert flow.grant is not None
    assert flow.grant[0] == 7


def test_a_hand_off_past_its_claim_window_is_checked_with_the_server() -> None:
    """Row 1 (adv_10), the decision: a waiter that comes back after its claim window (its loop
    was blocked) must not return the handed lease, which may have gone to another client: it
    sends ACQUIRE again, which grants it only if the key is still its own. Fails before the
    fix: the handed grant was returned as it was."""
    flow = _flow()
    flow.handed = Handed(7, time.time() - 3.0, 104.0)
    trip = flow.next_trip(107.0)
    assert trip is not None
    assert flow.grant is None
    assert trip.args[0] == b"\1" * 16


def test_the_flow_reads_replies_without_a_server() -> None:
    clock = ServerClock()
    flow = _flow()
    trip = flow.next_trip(100.0)
    assert trip is not None
    assert trip.bound == pytest.approx(10.0)
    assert not flow.on_reply([0, 5000, b"1700000000000000"], 1.0, 1.002, 100.0, clock, True)
    assert flow.retry_at == pytest.approx(101.0)  # the poll, sooner than the holder's 5 s
    assert clock.error == pytest.approx(0.001)
    assert flow.wait_time(100.5) == pytest.approx(0.5)
    with pytest.raises(LockTimeout):
        flow.wait_time(110.0)
    assert flow.on_reply([1, b"42", 30000], 1.0, 1.001, 100.0, clock, True)
    assert flow.grant == (42, 31.0, pytest.approx(129.999), False)  # deadline: sent + TTL
    once = _flow(timeout=0)
    once.next_trip(100.0)
    with pytest.raises(LockTimeout):
        once.on_reply([0, 5000], 1.0, 1.001, 100.0, clock, True)
    assert once.leave_args() is None


async def test_a_waiter_blocked_past_its_claim_window_keeps_waiting(url: str) -> None:
    """Row 1 (adv_10), end to end: the key is handed to a waiter whose event loop then blocks
    past its claim window; another client takes the lapsed key. When the loop comes back the
    waiter keeps waiting, and gets the key only after that client releases it. Fails before
    the fix: acquire returned the lapsed lease (lost at entry) while the other client held it."""
    holder = KeyedLock(RedisBackend.from_url(url))
    waiter = KeyedLock(RedisBackend.from_url(url, poll=0.2))  # claim window 1.6 s
    intruder = KeyedLock(RedisBackend.from_url(url))
    raw = redis.Redis.from_url(url)
    queue = holder.backend.layout.lock("job")[2]  # type: ignore[attr-defined]
    gate = holder.acquire_sync("job")
    task = asyncio.create_task(waiter.acquire("job", timeout=30))
    while not raw.zcard(queue):
        await asyncio.sleep(0.002)
    taken = threading.Event()
    done = threading.Event()

    def intrude() -> None:
        lease = intruder.acquire_sync("job", timeout=10)  # gets it when the claim lapses
        taken.set()
        done.wait(10)
        lease.release_sync()

    gate.release_sync()  # handed to the waiter, whose loop now blocks
    thread = threading.Thread(target=intrude)
    thread.start()
    deadline = time.monotonic() + 5
    while not taken.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)  # the waiter's loop is blocked: its claim lapses
    assert taken.is_set()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), 0.3)  # still waiting
    done.set()
    lease = await asyncio.wait_for(task, 10)
    assert not lease.lost
    thread.join(10)
    await lease.release()
    for locks in (holder, waiter, intruder):
        await locks.close()


def test_a_grant_whose_reply_came_after_its_expiry_is_never_returned() -> None:
    """A trip that stalled longer than the TTL (a loaded machine, a slow link) brought back a
    grant that had already run out, and the flow returned it: a caller got a lease that was
    already lost (seen under load by the chaos suite with 50 ms TTLs). Now it asks again."""
    clock = ServerClock()
    flow = _flow()
    assert flow.next_trip(100.0) is not None
    # granted for 30 s, but the reply took 31 s to come back
    assert not flow.on_reply([1, 7, 30_000, 0], 1.0, 32.0, 131.0, clock, True)
    assert flow.grant is None
    assert flow.retry_at == 131.0
    # a timely reply is a grant, dated from before the request
    assert flow.on_reply([1, 7, 30_000, 0], 1.0, 1.5, 131.5, clock, True)
    assert flow.grant is not None
    assert flow.grant[2] == pytest.approx(161.0)
