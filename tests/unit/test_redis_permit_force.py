"""``keylock release --force`` of a Redis permit (semaphores, RW locks): one live permit is
broken as if it had lapsed (the next grant took over), the line is served at once, and the
broken holder learns it at its next renewal or release. On a server and a Redis Cluster."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import cast

import pytest
import redis
import redis.cluster

from keylock import KeyedRWLock, KeyedSemaphore, Lease, LeaseLost
from keylock.backends import RedisBackend
from keylock.backends.redis import force_release
from keylock.backends.redis._keys import Layout
from keylock.backends.redis._permit_scripts import PERMIT_STATS
from keylock.cli import main

from .._poll import polled
from .._redis_server import Cluster, Server
from .test_redis_permit_invariants import KEY, LAYOUT, STEPS, Driver

Admin = redis.Redis | redis.cluster.RedisCluster


class Store:
    """One Redis store: backends on it (a new client each, as another host), and a client
    for the operator's force_release."""

    def __init__(self, url: str, cluster: bool) -> None:
        self.url = url
        self.cluster = cluster
        self.admin: Admin = (
            redis.cluster.RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
        )

    def backend(self, **options: float | bool) -> RedisBackend:
        return RedisBackend.from_url(self.url, cluster=self.cluster, **options)  # type: ignore[arg-type]

    def seen(self, stored: str) -> tuple[int, int, int]:
        """The server's view of permit key *stored* (a process's statistics count its own
        holders as it believes them): live permits, the newest one's token, waiters."""
        return _seen(self.admin, stored)


def _seen(client: Admin, stored: str) -> tuple[int, int, int]:
    keys = Layout("keylock").permit(stored, b"")[:4]
    reply = cast("list[bytes | int]", client.eval(PERMIT_STATS.text, 4, *keys))
    live, token, _, waiting, *_ = reply
    return int(live), int(token), int(waiting)


@pytest.fixture(params=["redis", "redis-cluster"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "redis":
        server: Server = request.getfixturevalue("redis_server")
        server.flush()
        found = Store(server.url, cluster=False)
    else:
        cluster: Cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        found = Store(f"redis://{cluster.host}:{cluster.port}/0", cluster=True)
    yield found
    found.admin.close()


def test_forcing_the_newest_permit_grants_the_waiter_at_once(store: Store) -> None:
    """A full semaphore (limit 2) with a waiter in another backend (poll=60 s: only the
    hand-off can wake it in time): force_release with no owner breaks the newest permit
    only; the waiter is granted at once, took_over, with a higher token; the other holder is
    untouched; never more than 2 live. The broken holder's renewal reports it lost and its
    release raises LeaseLost. Fails on the old code: force_release found no lock and
    returned False, and the waiter stayed in line."""
    holder_backend = store.backend(ttl=1.5)
    holder = KeyedSemaphore(holder_backend, limit=2, namespace="app")
    waiter = KeyedSemaphore(store.backend(poll=60.0), limit=2, namespace="app")
    first, second = holder.acquire_sync("api"), holder.acquire_sync("api")
    granted: list[Lease] = []

    def wait() -> None:
        granted.append(waiter.acquire_sync("api", timeout=30))

    thread = threading.Thread(target=wait)
    thread.start()
    assert polled(lambda: store.seen("app\x00api")[2] == 1)
    started = time.monotonic()
    assert force_release(store.admin, "app\x00api")
    thread.join(30)
    assert granted
    got = granted[0]
    assert time.monotonic() - started < 5.0  # woken by the hand-off, not its 60 s poll
    assert got.took_over
    assert got.token > second.token
    assert store.seen("app\x00api")[:2] == (2, got.token)  # first and the waiter: never 3
    assert polled(lambda: second.lost)  # its renewal found the permit gone
    assert not first.lost
    with pytest.raises(LeaseLost):
        second.release_sync()
    first.release_sync()  # untouched: its own release succeeds
    got.release_sync()
    assert store.seen("app\x00api")[0] == 0
    holder.close_sync()
    waiter.close_sync()


def test_an_owner_selects_the_permit_and_an_unknown_owner_breaks_nothing(store: Store) -> None:
    """force_release with an owner breaks that holder's permit (here the older one), not the
    newest; an owner holding no permit there changes nothing and says so (False). The next
    grant took over the broken permit. Fails on the old code: every call returned False."""
    sem = KeyedSemaphore(store.backend(auto_renew=False), limit=2, namespace="app")
    first, second = sem.acquire_sync("api"), sem.acquire_sync("api")
    assert not force_release(store.admin, "app\x00api", owner=b"someone else")
    assert not force_release(store.admin, "app\x00api", owner=(b"\x07" * 16).hex())
    assert store.seen("app\x00api")[:2] == (2, second.token)
    assert force_release(store.admin, "app\x00api", owner=first.owner.hex())
    assert not force_release(store.admin, "app\x00api", owner=first.owner)  # broken already
    assert store.seen("app\x00api")[:2] == (1, second.token)
    # another process's grant (this one still counts the broken permit as its own until
    # its holder learns it is lost)
    other = KeyedSemaphore(store.backend(auto_renew=False), limit=2, namespace="app")
    third = other.acquire_sync("api", timeout=0)
    assert third.took_over
    with pytest.raises(LeaseLost):
        first.release_sync()
    second.release_sync()
    third.release_sync()
    sem.close_sync()
    other.close_sync()


def test_the_lone_holder_of_an_uncontended_grant_can_be_forced(store: Store) -> None:
    """The fast path keeps a lone holder in the record's solo fields, with no holders zset:
    it is found and broken all the same, with or without its owner named; its extend then
    fails and its release raises LeaseLost; the next grant took over. Fails on the old code:
    force_release returned False and the permit stayed held."""
    backend = store.backend(auto_renew=False)
    sem = KeyedSemaphore(backend, limit=3, namespace="app")
    record = backend.layout.permit_extend("app\x00solo")[0]
    for owner_named in (False, True):
        lone = sem.acquire_sync("solo")
        assert store.admin.hget(record, "solo") == lone.owner  # the fast path's lone holder
        assert force_release(store.admin, "app\x00solo", owner=lone.owner if owner_named else None)
        assert store.seen("app\x00solo")[0] == 0
        with pytest.raises(LeaseLost):
            lone.extend_sync()
        with pytest.raises(LeaseLost):
            lone.release_sync()
        after = sem.acquire_sync("solo", timeout=0)
        assert after.took_over
        assert after.token > lone.token
        after.release_sync()
    assert not force_release(store.admin, "app\x00solo")  # nobody holds it: nothing broken
    assert not force_release(store.admin, "app\x00never")  # never held: nothing written
    assert store.admin.exists(backend.layout.permit_extend("app\x00never")[0]) == 0
    sem.close_sync()


def test_forcing_the_writer_lets_the_queued_readers_in(store: Store) -> None:
    """An RW lock's writer broken (named by owner, as inspect shows it) with two readers of
    another backend in line (poll=60 s): both are granted at once, together, the first
    took_over; the writer's release raises LeaseLost. Fails on the old code: force_release
    returned False and the readers waited for the writer's TTL."""
    rw = KeyedRWLock(store.backend(), namespace="app")
    other = KeyedRWLock(store.backend(poll=60.0), namespace="app")
    writer = rw.acquire_write_sync("doc")
    readers: list[Lease] = []

    def read() -> None:
        readers.append(other.acquire_read_sync("doc", timeout=30))

    threads = [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert polled(lambda: store.seen("app\x00doc")[2] == 2)
    started = time.monotonic()
    assert force_release(store.admin, "app\x00doc", owner=writer.owner.hex())
    for thread in threads:
        thread.join(30)
    assert len(readers) == 2
    assert time.monotonic() - started < 5.0  # woken by the hand-off, not their 60 s poll
    assert min(r.token for r in readers) > writer.token
    assert sorted(r.took_over for r in readers) == [False, True]  # one lapsed permit
    assert store.seen("app\x00doc")[0] == 2
    with pytest.raises(LeaseLost):
        writer.release_sync()
    for reader in readers:
        reader.release_sync()
    rw.close_sync()
    other.close_sync()


def test_a_retried_force_breaks_nothing_more(store: Store) -> None:
    """The wire runs a script again after a connection error (a lost reply): PERMIT_FORCE of
    one owner, run twice, breaks that one permit and counts one lapse; the second run changes
    nothing. force_release with no owner names the newest holder it saw, so its retry cannot
    break a second permit. Fails on the old code: there was no permit force script."""
    from keylock.backends.redis._permit_admin import PERMIT_FORCE

    sem = KeyedSemaphore(store.backend(auto_renew=False), limit=3, namespace="app")
    permits = [sem.acquire_sync("api") for _ in range(3)]
    keys = Layout("keylock").permit("app\x00api", b"")[:4]
    newest = permits[-1].owner
    for expected in (1, 0):
        assert store.admin.eval(PERMIT_FORCE.text, 4, *keys, newest, "app\x00api") == expected
        assert store.seen("app\x00api")[:2] == (2, permits[1].token)
        assert store.admin.hget(keys[0], "lapsed") == b"1"
    for lease in permits[:2]:
        lease.release_sync()
    with pytest.raises(LeaseLost):
        permits[2].release_sync()
    sem.close_sync()


def test_cli_release_force_of_a_redis_permit_shows_the_holder_and_releases_it(
    redis_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """``keylock release --force KEY --redis-url URL`` on a semaphore key: shows the newest
    holder (token, permits of limit), asks, and breaks only that permit; --owner naming
    another owner breaks nothing. Fails on the old code: it refused ("not supported on
    Redis") and the permit stayed held."""
    redis_server.flush()
    url = redis_server.url
    sem = KeyedSemaphore(RedisBackend.from_url(url), limit=3, namespace="myapp")
    first, second = sem.acquire_sync("vendor:1"), sem.acquire_sync("vendor:1")
    argv = ["release", "--force", "myapp:vendor:1", "--redis-url", url]
    assert main([*argv, "--owner", "0123456789abcdef", "--yes"]) == 1
    out = capsys.readouterr().out
    assert "not released" in out
    client = redis.Redis.from_url(url)
    assert _seen(client, "myapp\x00vendor:1")[:2] == (2, second.token)
    assert main([*argv, "--yes"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith(f"'myapp:vendor:1' is held: token {second.token}, 2 permits")
    assert f"newest: owner {second.owner.hex()}" in lines[0]
    assert lines[-1] == "released"
    assert err == ""
    assert _seen(client, "myapp\x00vendor:1")[:2] == (1, first.token)
    client.close()
    with pytest.raises(LeaseLost):
        second.release_sync()
    first.release_sync()
    sem.close_sync()


class ForceDriver(Driver):
    """The permit scripts' randomized driver (test_redis_permit_invariants), with operators
    forcing a holder's permit (or an owner's that holds none) among the clients' calls."""

    def step(self) -> None:
        rng = self.rng
        if rng.random() < 0.12:
            from keylock.backends.redis._permit_admin import PERMIT_FORCE

            held = sorted(self.holders(self.prev))
            owner = rng.choice(held) if held and rng.random() < 0.85 else self.owner()
            reply = self.call(PERMIT_FORCE, owner, (owner, KEY), "force")
            self.check(f"force {owner[-2:].hex()} = {reply}", owner, True)
            return
        super().step()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_forces_among_the_clients_calls_keep_the_permit_invariants(store: Store, seed: int) -> None:
    """The permit scripts' invariants (used is the holders' weight, within the limit; TTLs
    outlive every holder; no live holder dropped but the one forced; a new holder was in line;
    a hand-off promises no more than the server keeps) hold after every call of the
    randomized driver when forces of holders, lone ones included, and retried forces are
    mixed in. Fails on the old code: there was no permit force script."""
    if store.cluster:
        node = store.admin.get_node_from_key(LAYOUT.permit(KEY, b"")[0])  # type: ignore[union-attr]
        listen = redis.Redis(host=node.host, port=node.port)
    else:
        listen = redis.Redis.from_url(store.url)
    driver = ForceDriver(store.admin, listen, seed)
    try:
        for _ in range(STEPS):
            driver.step()
        assert any(
            line.startswith("force") and line.split(" = ")[1].startswith("1") for line in driver.log
        )
    finally:
        driver.pubsub.close()
        listen.close()
