"""The permit scripts on a real server (and a Redis Cluster, and fakeredis): capacity, FIFO
across weights, one token counter floored at the server clock, per-permit expiry, the recorded
limit, hand-offs published to every waiter that now fits, extend, leave, took_over."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.cluster

from keylock.backends.redis import _permit_scripts as scripts
from keylock.backends.redis._keys import Layout
from keylock.backends.redis._listener import HandOff, parse_hand_off

from .._redis_server import Cluster, Server

RW = 1 << 30
STAY_MS = 10_000


class Arbiter:
    """The permit scripts of one permit key, called directly; hand-offs read off pub/sub."""

    def __init__(self, client: Any, key: str, listen: Any) -> None:
        self.client = client
        self.key = key
        self.layout = Layout("kltest")
        self.channel = self.layout.wake_channel("proc-a")
        self.pubsub = listen.pubsub()
        self.pubsub.subscribe(self.channel, self.layout.wake_channel("proc-b"))
        confirmed = 0  # both subscriptions in force before any script publishes
        deadline = time.monotonic() + 5
        while confirmed < 2:
            assert time.monotonic() < deadline
            message = self.pubsub.get_message(timeout=0.05)
            confirmed += message is not None and message["type"] == "subscribe"

    def run(self, script: Any, owner: bytes, *args: object) -> Any:
        keys = self.layout.permit(self.key, owner)
        return self.client.eval(script.text, len(keys), *keys, *args)

    def acquire(
        self,
        owner: bytes,
        *,
        limit: int,
        weight: int = 1,
        ttl_ms: int = 30_000,
        wait: bool = False,
        claim_ms: int = 5_000,
        channel: str | None = None,
    ) -> list[Any]:
        reply = self.run(
            scripts.PERMIT_ACQUIRE,
            owner,
            owner,
            ttl_ms,
            "1" if wait else "0",
            STAY_MS,
            channel or self.channel,
            claim_ms,
            limit,
            weight,
            self.key,
        )
        return [int(x) if isinstance(x, bytes) and x.isdigit() else x for x in reply]

    def release(self, owner: bytes) -> int:
        return int(self.run(scripts.PERMIT_RELEASE, owner, owner, self.key, 10_000))

    def leave(self, owner: bytes, mark_ms: int = 0) -> int:
        return int(self.run(scripts.PERMIT_LEAVE, owner, owner, self.key, mark_ms))

    def extend(self, owner: bytes, ttl_ms: int) -> int:
        keys = self.layout.permit_extend(self.key)
        return int(self.client.eval(scripts.PERMIT_EXTEND.text, 2, *keys, owner, ttl_ms))

    def stats(self) -> list[Any]:
        """PERMIT_STATS' reply but its last element, the TTL left (inspect's tests check it)."""
        keys = self.layout.permit(self.key, b"")[:4]
        return list(self.client.eval(scripts.PERMIT_STATS.text, 4, *keys))[:5]

    def hand_offs(self, count: int) -> list[HandOff]:
        """The next *count* hand-offs published (bounded wait), then checks none follows."""
        found: list[HandOff] = []
        deadline = time.monotonic() + 5
        while len(found) < count and time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.05)
            if message is not None and message["type"] == "message":
                hand_off = parse_hand_off(message["data"])
                assert hand_off is not None
                found.append(hand_off)
        assert len(found) == count
        assert self.pubsub.get_message(timeout=0.05) is None
        return found


@pytest.fixture(params=["redis", "redis-cluster", "redis-fake"])
def arbiter(request: pytest.FixtureRequest) -> Iterator[Arbiter]:
    key = "ns\0permit:{1}"  # a namespace's NUL and braces: the tag must cope
    if request.param == "redis":
        server: Server = request.getfixturevalue("redis_server")
        server.flush()
        client = redis.Redis.from_url(server.url)
        arbiter = Arbiter(client, key, client)
    elif request.param == "redis-cluster":
        cluster: Cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        client = redis.cluster.RedisCluster(host=cluster.host, port=cluster.port)
        # listen on the node that runs the scripts: the cluster bus relays a PUBLISH to the
        # other nodes only once its links are up, which a cluster just formed may not have
        node = client.get_node_from_key(Layout("kltest").permit(key, b"")[0])
        listen = redis.Redis(host=node.host, port=node.port)
        arbiter = Arbiter(client, key, listen)
    else:
        import fakeredis

        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        arbiter = Arbiter(client, key, client)
    yield arbiter
    arbiter.pubsub.close()
    client.close()


def owner(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_grants_up_to_the_limit_with_rising_tokens(arbiter: Arbiter) -> None:
    grants = [arbiter.acquire(owner(n), limit=3) for n in range(3)]
    assert [g[0] for g in grants] == [1, 1, 1]
    tokens = [g[1] for g in grants]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 3
    assert arbiter.acquire(owner(9), limit=3)[0] == 0  # full
    assert arbiter.stats()[0] == 3
    assert arbiter.release(owner(1)) == 1
    again = arbiter.acquire(owner(9), limit=3)
    assert again[0] == 1
    assert again[1] > max(tokens)


def test_a_retried_acquire_returns_the_same_permit(arbiter: Arbiter) -> None:
    first = arbiter.acquire(owner(1), limit=2)
    assert arbiter.acquire(owner(1), limit=2) == first
    assert arbiter.stats()[0] == 1


def test_tokens_are_floored_at_the_server_clock_in_us(arbiter: Arbiter) -> None:
    token = arbiter.acquire(owner(1), limit=2)[1]
    server_us = int(arbiter.client.time()[0]) * 1_000_000
    assert abs(token - server_us) < 60 * 1_000_000
    arbiter.client.flushall()  # the counter is gone (a restart without persistence)
    assert arbiter.acquire(owner(2), limit=2)[1] > token


def test_a_waiting_writer_blocks_readers_that_arrive_after_it(arbiter: Arbiter) -> None:
    reader, writer, late, try_ = owner(1), owner(2), owner(3), owner(4)
    assert arbiter.acquire(reader, limit=RW)[0] == 1
    queued = arbiter.acquire(writer, limit=RW, weight=RW, wait=True)
    assert queued[0] == 0
    assert queued[1] > 0  # the soonest holder's expiry, ms: the writer looks again then
    assert arbiter.acquire(late, limit=RW, wait=True)[0] == 0  # would fit, but FIFO
    assert arbiter.acquire(try_, limit=RW)[0] == 0  # a try never passes the line
    assert arbiter.release(reader) == 1
    (to_writer,) = arbiter.hand_offs(1)
    assert to_writer.head == writer
    assert to_writer.key == arbiter.key
    assert to_writer.claim == 5.0
    assert arbiter.acquire(writer, limit=RW, weight=RW)[1] == to_writer.token  # it holds it
    assert arbiter.acquire(late, limit=RW, wait=True)[0] == 0
    assert arbiter.release(writer) == 1
    (to_late,) = arbiter.hand_offs(1)
    assert to_late.head == late
    assert to_late.token > to_writer.token


def test_a_release_hands_off_to_every_head_that_now_fits(arbiter: Arbiter) -> None:
    """Three readers queued behind a writer (two in one process, one in another) are all
    handed a permit by the writer's release, one message each; the writer queued behind
    them is not."""
    writer, second_writer = owner(1), owner(9)
    readers = [owner(2), owner(3), owner(4)]
    assert arbiter.acquire(writer, limit=RW, weight=RW)[0] == 1
    other = arbiter.layout.wake_channel("proc-b")
    for n, reader in enumerate(readers):
        channel = other if n == 2 else None
        assert arbiter.acquire(reader, limit=RW, wait=True, channel=channel)[0] == 0
    assert arbiter.acquire(second_writer, limit=RW, weight=RW, wait=True)[0] == 0
    assert arbiter.release(writer) == 1
    handed = arbiter.hand_offs(3)
    assert [h.head for h in handed] == readers
    tokens = [h.token for h in handed]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 3
    live, newest, newest_owner, waiting, limit = arbiter.stats()
    assert (live, int(newest), newest_owner, waiting, limit) == (3, tokens[-1], readers[2], 1, RW)


def test_a_writer_that_leaves_the_line_lets_the_readers_behind_it_in(arbiter: Arbiter) -> None:
    reader, writer, behind = owner(1), owner(2), owner(3)
    arbiter.acquire(reader, limit=RW)
    assert arbiter.acquire(writer, limit=RW, weight=RW, wait=True)[0] == 0
    assert arbiter.acquire(behind, limit=RW, wait=True)[0] == 0
    assert arbiter.leave(writer) == 1  # its timeout ran out
    (handed,) = arbiter.hand_offs(1)
    assert handed.head == behind
    assert arbiter.stats()[0] == 2


def test_limit_mismatch_is_refused_and_changes_nothing(arbiter: Arbiter) -> None:
    assert arbiter.acquire(owner(1), limit=3)[0] == 1
    assert arbiter.acquire(owner(2), limit=4, wait=True) == [-1, 3]
    assert arbiter.acquire(owner(2), limit=4) == [-1, 3]
    assert arbiter.stats()[3] == 0  # not queued
    assert arbiter.stats()[0] == 1  # not granted
    assert arbiter.release(owner(1)) == 1
    assert arbiter.stats()[4] == -1  # the record went with the last holder
    assert arbiter.acquire(owner(2), limit=4)[0] == 1  # a new limit, now nobody holds


def test_a_waiter_keeps_the_limit_recorded(arbiter: Arbiter) -> None:
    arbiter.acquire(owner(1), limit=1)
    arbiter.acquire(owner(2), limit=1, wait=True)
    arbiter.release(owner(1))
    arbiter.hand_offs(1)
    arbiter.acquire(owner(3), limit=1, wait=True)
    assert arbiter.release(owner(2)) == 1
    arbiter.hand_offs(1)
    assert arbiter.acquire(owner(4), limit=2) == [-1, 1]


def test_a_dead_holder_frees_its_permit_at_its_ttl_and_is_taken_over(arbiter: Arbiter) -> None:
    live, dead = owner(1), owner(2)
    arbiter.acquire(live, limit=2)
    arbiter.acquire(dead, limit=2, ttl_ms=50)
    assert arbiter.acquire(owner(3), limit=2)[0] == 0
    deadline = time.monotonic() + 5
    while (reply := arbiter.acquire(owner(3), limit=2))[0] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert reply[3] == 1  # took the dead holder's permit over
    assert arbiter.release(dead) == 0  # lost: LeaseLost for its holder
    assert arbiter.extend(dead, 1000) == 0
    arbiter.release(owner(3))
    assert arbiter.acquire(owner(4), limit=2)[3] == 0  # one lapse, taken over once


def test_a_writer_takes_over_every_lapsed_reader_at_once(arbiter: Arbiter) -> None:
    for n in range(3):
        arbiter.acquire(owner(n), limit=RW, ttl_ms=30)
    deadline = time.monotonic() + 5
    while (reply := arbiter.acquire(owner(9), limit=RW, weight=RW))[0] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert reply[3] == 1
    arbiter.release(owner(9))
    assert arbiter.acquire(owner(10), limit=RW)[3] == 0


def test_an_expired_holder_is_dropped_and_the_line_served_by_any_caller(
    arbiter: Arbiter,
) -> None:
    """A waiter is handed the permit of a holder that died by the next caller's script, not
    only by a release."""
    arbiter.acquire(owner(1), limit=1, ttl_ms=50)
    assert arbiter.acquire(owner(2), limit=1, wait=True)[0] == 0
    time.sleep(0.06)  # past the holder's TTL (nothing polls here: one look after it)
    assert arbiter.acquire(owner(3), limit=1)[0] == 0  # a try: the waiter goes first
    (handed,) = arbiter.hand_offs(1)
    assert handed.head == owner(2)
    assert handed.claim == 0  # took over: it asks, and the reply says so
    assert arbiter.acquire(owner(2), limit=1, wait=True)[3] == 1


def test_extend_moves_only_its_own_expiry(arbiter: Arbiter) -> None:
    arbiter.acquire(owner(1), limit=2, ttl_ms=100)
    arbiter.acquire(owner(2), limit=2, ttl_ms=100)
    assert arbiter.extend(owner(1), 30_000) == 1
    assert arbiter.extend(owner(7), 30_000) == 0  # never held
    deadline = time.monotonic() + 5
    while arbiter.stats()[0] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert arbiter.release(owner(1)) == 1
    assert arbiter.release(owner(1)) == 2  # a retry after a lost reply
    assert arbiter.release(owner(2)) == 0  # it lapsed


def test_a_late_acquire_after_its_leave_grants_nothing(arbiter: Arbiter) -> None:
    assert arbiter.leave(owner(1), mark_ms=10_000) == 1
    assert arbiter.acquire(owner(1), limit=2, wait=True) == [0, -3]
    assert arbiter.stats() == [0, b"-1", b"", 0, -1]


def test_a_grant_given_back_unused_passes_its_took_over_on(arbiter: Arbiter) -> None:
    arbiter.acquire(owner(1), limit=1, ttl_ms=30)
    deadline = time.monotonic() + 5
    while (reply := arbiter.acquire(owner(2), limit=1))[0] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert reply[3] == 1
    assert arbiter.leave(owner(2)) == 1  # the caller gave up as the grant landed
    assert arbiter.acquire(owner(3), limit=1)[3] == 1


def test_nothing_is_left_behind_after_the_last_release(arbiter: Arbiter) -> None:
    arbiter.acquire(owner(1), limit=2)
    arbiter.acquire(owner(2), limit=2)
    arbiter.acquire(owner(3), limit=2, wait=True)
    arbiter.leave(owner(3))
    arbiter.release(owner(1))
    arbiter.release(owner(2))
    record, holders, queue, waiting = arbiter.layout.permit(arbiter.key, b"")[:4]
    assert arbiter.client.hget(record, "limit") in (None, b"0")  # (0: no limit recorded)
    assert arbiter.client.exists(holders, queue, waiting) == 0
    assert 0 < arbiter.client.pttl(record) <= 120_000  # the counter, a while


def test_a_lone_holder_lives_in_the_record_and_counts_as_any_holder(arbiter: Arbiter) -> None:
    """An uncontended grant keeps its holder's expiry in the record, making no holders zset;
    stats count it, a retried acquire gets the same permit (and moves it to the zset), a
    second holder joins it, and releases (and their retries) end both. Fails before: the
    fast path made a holders zset for every grant."""
    record, holders = arbiter.layout.permit(arbiter.key, b"")[:2]
    granted, token, _, took = arbiter.acquire(owner(1), limit=2)
    assert (granted, took) == (1, 0)
    assert arbiter.client.exists(holders) == 0
    assert arbiter.client.hget(record, "solo") == owner(1)
    assert arbiter.stats() == [1, str(token).encode(), owner(1), 0, 2]
    assert arbiter.acquire(owner(1), limit=2) == [1, token, 30_000, 0]  # a retry
    assert arbiter.client.hget(record, "solo") is None
    assert arbiter.client.zscore(holders, owner(1)) is not None
    assert arbiter.release(owner(1)) == 1
    assert arbiter.release(owner(1)) == 2
    arbiter.acquire(owner(2), limit=2)  # alone again: in the record
    second = arbiter.acquire(owner(3), limit=2)  # joins it: both in the zset
    assert second[0] == 1
    assert second[1] > token
    assert arbiter.client.zcard(holders) == 2
    assert arbiter.stats()[0] == 2
    assert arbiter.release(owner(2)) == 1
    assert arbiter.release(owner(3)) == 1
    assert arbiter.client.exists(holders) == 0


def test_a_lone_holder_is_extended_and_taken_over_when_it_lapses(arbiter: Arbiter) -> None:
    """The lone holder kept in the record: extend moves its expiry there, and once it lapses
    the next grant takes it over, its release finds it lost and its extend fails. Fails
    before on the record: no solo entry was written."""
    record = arbiter.layout.permit(arbiter.key, b"")[0]
    arbiter.acquire(owner(1), limit=1, ttl_ms=40)
    before = int(arbiter.client.hget(record, "solo_expires"))
    assert arbiter.extend(owner(1), 60) == 1
    assert int(arbiter.client.hget(record, "solo_expires")) > before
    deadline = time.monotonic() + 5
    while (reply := arbiter.acquire(owner(2), limit=1))[0] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert reply[3] == 1  # took the lapsed permit over
    assert arbiter.release(owner(1)) == 0
    assert arbiter.extend(owner(1), 1000) == 0
    assert arbiter.release(owner(2)) == 1


@pytest.mark.parametrize("lone", [True, False], ids=["lone-holder", "zset-holder"])
def test_a_permit_is_taken_over_no_sooner_than_its_full_ttl(arbiter: Arbiter, lone: bool) -> None:
    """A permit granted at server time t (its token, in us) lapses no sooner than t + TTL: a
    client counts the TTL from before it sent the request, and must never believe a permit
    live that the server has already given away. Each trial spins a second caller's tries
    until it takes the lapsed permit over, and compares the two tokens. Fails before: the
    scripts dropped a holder once the server's clock, in whole ms, reached floor(t) + TTL, up
    to 1 ms early (the chaos row's "4 leases of weight 4 > limit 3": a takeover 0.6 ms
    before the expiry the paused holder was told)."""
    ttl_ms, limit = 5, 1 if lone else 2
    if not lone:  # a second, long-lived holder: the short one is kept in the holders zset
        arbiter.acquire(owner(100), limit=limit)
    for trial in range(20):
        first, second = owner(2 * trial + 1), owner(2 * trial + 2)
        granted, token, *_ = arbiter.acquire(first, limit=limit, ttl_ms=ttl_ms)
        assert granted == 1
        deadline = time.monotonic() + 5
        while (reply := arbiter.acquire(second, limit=limit))[0] != 1:
            assert time.monotonic() < deadline
        assert reply[3] == 1  # it took the lapsed permit over
        assert reply[1] >= token + ttl_ms * 1000, (trial, token, reply[1])
        assert arbiter.release(second) == 1
        assert arbiter.release(first) == 0  # lost


@pytest.mark.parametrize("key", ["agent:42", "a}b", "{x}", "ns\0job", "é/ü"])
def test_every_key_of_a_permit_key_shares_one_hash_tag_apart_from_the_lock(key: str) -> None:
    layout = Layout("keylock")
    names = layout.permit(key, b"\x01" * 16)
    tags = {name[name.index("{") + 1 : name.index("}")] for name in names}
    assert len(tags) == 1
    assert set(names[:2]) == set(layout.permit_extend(key))
    assert not set(names) & set(layout.acquire(key, b"\x01" * 16))
    assert layout.parse_permit(names[0]) == key
    assert all(layout.parse(name) is None for name in names)  # not a lock to `inspect`
    assert [layout.parse_permit(name) for name in names[1:]] == [None] * 4
