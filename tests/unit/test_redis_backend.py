"""RedisBackend specifics: owner checks in the scripts, Cluster-safe keys, auto-renew and
loss signalling, connection errors, tokens from the server clock."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time

import pytest
import redis

from keylock import BackendUnavailable, KeyedLock, LeaseLost, LockTimeout
from keylock.backends import RedisBackend
from keylock.backends.redis import _scripts
from keylock.backends.redis._flow import ServerClock
from keylock.backends.redis._keys import Layout, tag

from .._redis_server import Cluster, Server


@pytest.fixture
def url(redis_server: Server) -> str:
    redis_server.flush()
    return redis_server.url


def _slot_tags(keys: list[str]) -> set[str]:
    tags = set()
    for key in keys:
        start = key.index("{")
        tags.add(key[start + 1 : key.index("}", start + 1)])
    return tags


@pytest.mark.parametrize("key", ["agent:42", "a}b", "{x}", "}", "{", "é/ü"])
def test_every_key_of_a_lock_shares_one_hash_tag(key: str) -> None:
    keys = Layout("keylock").acquire(key, b"\x01" * 16)  # the departure mark too
    assert len(_slot_tags(keys)) == 1
    assert _slot_tags(keys) != {""}
    assert "{" not in tag(key)
    assert "}" not in tag(key)


async def test_a_forged_owner_cannot_release_or_extend_on_the_server(url: str) -> None:
    locks = KeyedLock(RedisBackend.from_url(url), namespace="own")
    lease = await locks.acquire("mine")
    backend = RedisBackend.from_url(url)
    forged = b"\x02" * 16
    assert (
        backend._run_sync(
            _scripts.RELEASE,
            "own:mine",
            backend.layout.acquire("own:mine", forged),
            [forged, "own:mine", _scripts.RELEASE_MARK_MS],
        )
        == 0
    )
    assert (
        backend._run_sync(
            _scripts.EXTEND, "own:mine", backend.layout.extend("own:mine"), [forged, 1, 2, 3]
        )
        == 0
    )
    with pytest.raises(LockTimeout):
        await KeyedLock(backend, namespace="own").acquire("mine", timeout=0)
    await lease.release()
    await locks.close()
    await backend.close()


async def test_tokens_follow_the_server_clock(url: str) -> None:
    locks = KeyedLock(RedisBackend.from_url(url))
    lease = await locks.acquire("clock")
    server_us = int(redis.Redis.from_url(url).time()[0]) * 1_000_000
    assert abs(lease.token - server_us) < 60 * 1_000_000  # µs since the epoch, roughly now
    await lease.release()
    await locks.close()


async def test_auto_renew_keeps_a_lease_past_its_ttl(url: str) -> None:
    locks = KeyedLock(RedisBackend.from_url(url, ttl=0.6))
    other = KeyedLock(RedisBackend.from_url(url, ttl=0.6))
    async with locks("renewed") as lease:
        await asyncio.sleep(1.5)  # 2.5 TTLs
        assert not lease.lost
        with pytest.raises(LockTimeout):
            await other.acquire("renewed", timeout=0)
    await locks.close()
    await other.close()


async def test_without_auto_renew_the_lease_lapses(url: str) -> None:
    locks = KeyedLock(RedisBackend.from_url(url, ttl=0.3, auto_renew=False))
    lease = await locks.acquire("lapse")
    await asyncio.sleep(0.5)
    assert lease.lost
    with pytest.raises(LeaseLost):
        await lease.release()
    await locks.close()


async def test_a_lost_lease_signals_and_cancels_the_section(url: str) -> None:
    """Renewal finds the lease gone (here: deleted behind our back): lost turns true, on_lost
    runs, and with cancel_on_lost the section is cancelled and LeaseLost leaves the block."""
    seen = []
    locks = KeyedLock(RedisBackend.from_url(url, ttl=0.6), on_lost=seen.append, cancel_on_lost=True)
    raw = redis.Redis.from_url(url)
    finished = False
    leases = []

    async def section() -> None:
        nonlocal finished
        async with locks("doomed") as lease:
            leases.append(lease)
            raw.delete(locks.backend.layout.lock("doomed")[0])  # type: ignore[attr-defined]
            await asyncio.sleep(5)  # cancelled at the next renewal (ttl/3)
            finished = True

    with pytest.raises(LeaseLost):
        await section()
    (lease,) = leases
    assert not finished
    assert lease.lost
    assert seen == [lease]
    await locks.close()


def test_sync_waiter_wakes_on_release_not_on_poll(url: str) -> None:
    """Release publishes a wake-up: the waiter gets the key long before its 10 s poll."""
    holder = KeyedLock(RedisBackend.from_url(url))
    waiter = KeyedLock(RedisBackend.from_url(url, poll=10.0))
    lease = holder.acquire_sync("ping")
    import threading

    got: list[float] = []

    def wait() -> None:
        start = time.monotonic()
        waiter.acquire_sync("ping", timeout=30).release_sync()
        got.append(time.monotonic() - start)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)
    lease.release_sync()
    thread.join(30)
    assert got
    assert got[0] < 5  # woken by the release message, not by the 10 s safety net
    holder.close_sync()
    waiter.close_sync()


def test_unreachable_server_is_backend_unavailable(redis_server: Server) -> None:
    from .._redis_server import free_port

    locks = KeyedLock(RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1") as info:
        locks.acquire_sync("k", timeout=0)
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert locks.statistics  # nothing held locally either:
    assert len(locks.backend._tier.local) == 0  # type: ignore[attr-defined]
    locks.close_sync()


def test_a_bad_url_is_a_value_error() -> None:
    """Row 38 (adv_31): a URL redis-py cannot read is bad input, not an outage: ValueError
    (it was BackendUnavailable, as if the server were down), without the password."""
    for url in ("nonsense://where", "http://x", "http://user:hunter2@x"):
        with pytest.raises(ValueError, match="bad Redis URL") as info:
            RedisBackend.from_url(url)
        assert not isinstance(info.value, BackendUnavailable)
        assert "hunter2" not in str(info.value)


def test_an_acquire_that_arrives_after_its_own_leave_grants_nothing(url: str) -> None:
    """A caller cancelled mid-ACQUIRE never reads the reply; it sends LEAVE, which may reach
    Redis before the ACQUIRE itself (another connection). The departure mark makes that late
    ACQUIRE a no-op. The control shows the same late ACQUIRE after a LEAVE without the mark
    grants a lease nobody holds: the key would be stranded for a whole TTL."""
    backend = RedisBackend.from_url(url)
    other = KeyedLock(RedisBackend.from_url(url))
    for key, marked in (("late", True), ("late-control", False)):
        owner = bytes([7]) * 16
        flow = backend._protocol(key, owner, None, 30.0)
        flow.in_flight = marked  # gave up with its ACQUIRE still on the way, or not
        backend._run_sync(_scripts.LEAVE, key, flow.keys, flow.leave_args() or [])
        trip = backend._protocol(key, owner, None, 30.0).next_trip(time.monotonic())
        assert trip is not None
        granted = backend._run_sync(_scripts.ACQUIRE, key, trip.keys, trip.args)[0]  # type: ignore[index]
        if marked:
            assert granted == 0
            other.acquire_sync(key, timeout=0).release_sync()  # free for anyone else
        else:
            assert granted == 1  # the phantom grant the mark prevents
            with pytest.raises(LockTimeout):
                other.acquire_sync(key, timeout=0)
    backend.close_sync()
    other.close_sync()


async def test_acquires_cancelled_at_random_instants_never_strand_the_key(url: str) -> None:
    """Cancel async acquires at random instants, many of them mid-call (the reply is then
    lost): every time, once the cancelled call has returned, another client gets the key at
    once. Without the LEAVE that follows a cancel (the naive version), a cancel that lands
    after Redis granted the key leaves it held by nobody until the TTL runs out."""
    rng = random.Random(7)
    locks = KeyedLock(RedisBackend.from_url(url))
    other = KeyedLock(RedisBackend.from_url(url))
    won = cancelled = 0
    for _ in range(150):
        task = asyncio.create_task(locks.acquire("mid", timeout=5))
        for _ in range(rng.randrange(4)):  # 0: before it starts; 1-3: mostly mid-call
            await asyncio.sleep(0)
        task.cancel()
        try:
            lease = await task
        except asyncio.CancelledError:
            cancelled += 1
        else:
            won += 1
            await lease.release()
        (await other.acquire("mid", timeout=0)).release_sync()
    assert cancelled > 50  # the storm really cancelled calls in flight, not just finished ones
    await locks.close()
    await other.close()


async def test_a_cancelled_release_still_frees_the_key(url: str) -> None:
    """A release cancelled mid-call completes in the background: the key is free right after,
    for a client elsewhere."""
    locks = KeyedLock(RedisBackend.from_url(url))
    other = KeyedLock(RedisBackend.from_url(url))
    for _ in range(30):
        lease = await locks.acquire("bye")
        task = asyncio.create_task(lease.release())
        await asyncio.sleep(0)  # the release script is on its way
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        (await other.acquire("bye", timeout=2)).release_sync()
    await locks.close()
    await other.close()


def test_a_hand_off_wakes_only_the_client_it_goes_to(url: str) -> None:
    """Three clients queue behind a holder; each release sends one wake-up, to the next
    holder's client only. (With one channel shared by every client, each release woke every
    client that had a waiter: up to 3 messages per client here, 6 in all.)"""
    holder = KeyedLock(RedisBackend.from_url(url))
    clients = [KeyedLock(RedisBackend.from_url(url)) for _ in range(3)]
    received = [0, 0, 0]
    for n, locks in enumerate(clients):
        backend = locks.backend
        waiting = backend._waiting  # type: ignore[attr-defined]
        original = waiting.deliver

        def counting(hand_off: object, n: int = n, original=original) -> None:
            received[n] += 1
            original(hand_off)

        waiting.deliver = counting
    gate = holder.acquire_sync("relay")
    order: list[int] = []

    def wait(n: int) -> None:
        with clients[n].sync("relay", timeout=30):
            order.append(n)

    raw = redis.Redis.from_url(url)
    queue = holder.backend.layout.lock("relay")[2]  # type: ignore[attr-defined]
    threads = []
    for n in range(3):
        threads.append(threading.Thread(target=wait, args=(n,)))
        threads[-1].start()
        while raw.zcard(queue) < n + 1:  # queued in this order: FIFO across clients
            time.sleep(0.001)
    gate.release_sync()
    for thread in threads:
        thread.join(30)
    assert order == [0, 1, 2]
    assert received == [1, 1, 1]
    for locks in (holder, *clients):
        locks.close_sync()


def test_taking_a_lease_does_not_wake_the_renewer(url: str) -> None:
    """One thread renews every lease of a backend; taking and releasing leases at the default
    TTL must not wake it each time (a thread switch per acquire: it used to be woken for every
    lease added while it slept for 60 s)."""
    locks = KeyedLock(RedisBackend.from_url(url))
    locks.acquire_sync("r").release_sync()  # starts the renewer
    renewer = locks.backend._renewer  # type: ignore[attr-defined]
    time.sleep(0.05)  # let it go to sleep
    notified = 0
    notify = renewer._cond.notify

    def counting(n: int = 1) -> None:
        nonlocal notified
        notified += 1
        notify(n)

    renewer._cond.notify = counting
    for _ in range(50):
        locks.acquire_sync("r").release_sync()
    assert notified == 0
    short = locks.acquire_sync("short", ttl=0.3)  # due sooner than it will look: woken once
    assert notified == 1
    short.release_sync()
    locks.close_sync()


def test_a_killed_connection_is_replaced_without_an_error(url: str) -> None:
    """The backend's own connections can be cut (CLIENT KILL, a server restart): the next call
    notices, opens a fresh connection and succeeds; with the server gone it is
    BackendUnavailable."""
    locks = KeyedLock(RedisBackend.from_url(url))
    raw = redis.Redis.from_url(url)
    for _ in range(3):
        locks.acquire_sync("cut").release_sync()
        raw.client_kill_filter(_type="normal", skipme=True)
    locks.acquire_sync("cut").release_sync()
    locks.close_sync()


@pytest.mark.parametrize(
    "pool_class", [redis.BlockingConnectionPool, redis.ConnectionPool], ids=["blocking", "plain"]
)
def test_any_client_pool_works(url: str, pool_class: type[redis.ConnectionPool]) -> None:
    """A plain pool is driven directly; any other pool through redis-py's client API."""
    client = redis.Redis(connection_pool=pool_class.from_url(url))
    locks = KeyedLock(RedisBackend(client))
    other = KeyedLock(RedisBackend.from_url(url))
    with locks.sync("pool") as lease:
        with pytest.raises(LockTimeout):
            other.acquire_sync("pool", timeout=0)
        lease.extend_sync(5)
    other.acquire_sync("pool", timeout=0).release_sync()
    locks.close_sync()
    other.close_sync()


def _in_forked_child(locks: KeyedLock, parents: object, out: object) -> None:
    """Runs in a child forked from a process that already used *locks*."""
    try:
        lease = locks.acquire_sync("forked", ttl=0.6)
        time.sleep(1.5)  # 2.5 TTLs: only the child's own renewer keeps it
        renewed = not lease.lost
        woke: list[float] = []

        def wait() -> None:
            start = time.monotonic()
            locks.acquire_sync("forked", timeout=10).release_sync()
            woke.append(time.monotonic() - start)

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.2)
        lease.release_sync()
        thread.join(10)
        try:
            parents.release_sync()  # type: ignore[attr-defined]
            inherited = "released"
        except LeaseLost:
            inherited = "LeaseLost"
        out.put((renewed, woke, inherited))  # type: ignore[attr-defined]
    except BaseException as exc:  # report, never hang the parent
        out.put(repr(exc))  # type: ignore[attr-defined]


def test_a_forked_child_runs_its_own_renewer_and_listener(url: str) -> None:
    """After fork the parent's threads do not exist in the child: a child that reused them
    would never renew (its lease silently lapses) and never be woken (it sleeps out the poll).
    The child also holds none of its parent's leases: releasing one raises LeaseLost."""
    import multiprocessing

    locks = KeyedLock(RedisBackend.from_url(url, poll=30.0))
    parents = locks.acquire_sync("parents")  # starts the listener and renewer threads
    with locks.sync("warm", timeout=5):
        pass
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_in_forked_child, args=(locks, parents, out))
    child.start()
    result = out.get(timeout=30)
    child.join(10)
    assert isinstance(result, tuple), result
    renewed, woke, inherited = result
    assert renewed
    assert woke
    assert woke[0] < 5  # woken by the release, not by the 30 s safety poll
    assert inherited == "LeaseLost"
    assert not parents.lost
    parents.release_sync()  # still the parent's
    locks.close_sync()


async def test_cluster_clients_of_either_kind(redis_cluster: Cluster) -> None:
    """Given only a sync Cluster client, async callers get an async Cluster client made from
    its options, and the other way round; every key of a lock lands in one slot of the real
    cluster (the scripts would fail with CROSSSLOT otherwise)."""
    import redis.asyncio.cluster
    import redis.cluster

    redis_cluster.flush()
    sync_only = KeyedLock(
        RedisBackend(redis.cluster.RedisCluster(host=redis_cluster.host, port=redis_cluster.port))
    )
    async_only = KeyedLock(
        RedisBackend(
            async_client=redis.asyncio.cluster.RedisCluster(
                host=redis_cluster.host, port=redis_cluster.port
            )
        )
    )
    for key in ("agent:1", "job:2", "{odd}", "é"):
        async with sync_only(key) as lease:
            with pytest.raises(LockTimeout):
                await async_only.acquire(key, timeout=0)
            with pytest.raises(LockTimeout):
                async_only.acquire_sync(key, timeout=0)
        async with async_only(key) as later:
            assert later.token > lease.token
        keys = sync_only.backend.layout.acquire(key, later.owner)  # type: ignore[attr-defined]
        slots = {sync_only.backend._sync().keyslot(name) for name in keys}  # type: ignore[attr-defined]
        assert len(slots) == 1
    assert "cluster" in repr(sync_only.backend)
    await sync_only.close()
    await async_only.close()


def test_single_flight_storage_errors_are_backend_unavailable(url: str) -> None:
    """The leader's result cannot be stored (the connection breaks): the caller gets
    BackendUnavailable naming the key, not a raw redis error, and the lease is released."""
    from keylock import SingleFlight

    backend = RedisBackend.from_url(url)
    flight = SingleFlight(backend)
    client = backend._sync()

    def broken_set(*args: object, **kwargs: object) -> None:
        raise redis.ConnectionError("connection reset by peer")

    client.set = broken_set  # type: ignore[method-assign]
    with pytest.raises(BackendUnavailable, match="user:1"):
        flight.do_sync("user:1", lambda: 42)
    other = KeyedLock(RedisBackend.from_url(url), namespace="flight")
    other.acquire_sync("flight:user:1", timeout=0).release_sync()  # nothing left held
    backend.close_sync()
    other.close_sync()


def test_a_handed_over_lease_is_dated_by_the_server_not_by_the_message(url: str) -> None:
    """A hand-off message can arrive late (a busy listener, a slow network): the lease was
    granted when the release script ran, so its expiry counts from then, on the server's clock
    read against ours. Dating it from the message's arrival (minus a fixed 50 ms, as before)
    promised a holder whose message came 200 ms late 150 ms it did not have."""
    backend = RedisBackend.from_url(url, ttl=10)
    holder = KeyedLock(RedisBackend.from_url(url))
    lease = holder.acquire_sync("dated")
    with pytest.raises(LockTimeout):  # queues, and reads the server clock on the way
        KeyedLock(backend).acquire_sync("dated", timeout=0.05)
    clock: ServerClock = backend.server_clock
    offset, error = clock.offset, clock.error
    assert error < 0.5
    assert abs(offset) < 1.0  # same host: the clocks agree
    server_now_us = (time.time() + offset) * 1e6
    late = 0.2
    granted_us = str(int(server_now_us - late * 1e6)).encode()
    expiry = clock.handed_expiry(granted_us, 10.0, time.time())
    assert expiry <= time.time() - late + 10.0 + 0.005  # never later than the true expiry
    assert expiry >= time.time() - late + 10.0 - 0.5  # and not needlessly early
    clock.reading = (100.0, 0.001)  # a server whose clock runs 100 s ahead of ours
    expiry = clock.handed_expiry(str(int((time.time() + 100.0) * 1e6)).encode(), 10.0, time.time())
    assert abs(expiry - (time.time() + 10.0)) < 0.1
    # no reading good to 1 s (taken over a slow link): never a guess that may run late (it
    # assumed the message came at once), but "ask the server": the flow sends an ACQUIRE
    clock.reading = (100.0, 1.5)
    now = time.time()
    assert clock.handed_expiry(granted_us, 10.0, now) == now
    lease.release_sync()
    holder.close_sync()
    backend.close_sync()


def test_a_hand_off_is_never_dated_by_two_clock_readings_at_once() -> None:
    """The listener thread dates a hand-off while a caller's thread takes a new reading of the
    server clock. A reading stored as two attributes (offset, then error) let it combine the
    new offset with the old, smaller error: a lease dated up to a round trip past its end.
    Here a clock that dates a hand-off at every attribute write sees only whole readings (the
    two-attribute version shows a third date, later than both)."""
    seen: list[float] = []
    granted_us = b"1000000000000000"

    class Watched(ServerClock):
        def __setattr__(self, name: str, value: object) -> None:
            super().__setattr__(name, value)
            seen.append(self.handed_expiry(granted_us, 10.0, 0.0))

    clock = Watched()
    clock.read(server_us=1_000_000_000_000_000, sent_at=999_999_999.0, received=1_000_000_000.8)
    first = seen[-1]
    clock.read(server_us=1_000_000_000_000_000, sent_at=999_999_999.95, received=1_000_000_000.05)
    second = seen[-1]
    assert set(seen[1:]) <= {first, second}, (seen, first, second)


def test_a_waiter_that_died_in_line_holds_a_handed_key_only_for_its_claim(url: str) -> None:
    """A waiter queues and dies (its process is gone; its place in line has not yet expired):
    the release hands it the key anyway. It holds the key for its claim window (its stay in
    line: 3 polls + 1 s), not the whole 30 s TTL, which is what it held before the claim window
    existed (the other client's 10 s wait then timed out). A live waiter handed the key keeps
    it past that window: its renewer extends it."""
    holder = KeyedLock(RedisBackend.from_url(url, poll=0.2))
    lease = holder.acquire_sync("ghost")
    ghost = RedisBackend.from_url(url, poll=0.2)  # stay in line: 1.6 s
    owner = b"\x09" * 16
    trip = ghost._protocol("ghost", owner, None, 30.0).next_trip(time.monotonic())
    assert trip is not None
    assert ghost._run_sync(_scripts.ACQUIRE, "ghost", trip.keys, trip.args)[0] == 0  # type: ignore[index]
    lease.release_sync()  # hands the key to the ghost
    other = KeyedLock(RedisBackend.from_url(url, poll=0.2))
    started = time.monotonic()
    taken = other.acquire_sync("ghost", timeout=10)
    assert time.monotonic() - started < 5  # the claim window, not the TTL
    # a live waiter keeps a handed-over lease past its claim window
    waiter = KeyedLock(RedisBackend.from_url(url, poll=0.2))
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire_sync("ghost", timeout=10)))
    thread.start()
    raw = redis.Redis.from_url(url)
    while not raw.zcard(other.backend.layout.lock("ghost")[2]):  # type: ignore[attr-defined]
        time.sleep(0.005)
    taken.release_sync()  # handed to the live waiter, for its 1.6 s claim window at first
    thread.join(10)
    (handed,) = got
    time.sleep(2.5)
    assert not handed.lost  # type: ignore[attr-defined]
    with pytest.raises(LockTimeout):
        other.acquire_sync("ghost", timeout=0)
    handed.release_sync()  # type: ignore[attr-defined]
    for locks in (holder, other, waiter):
        locks.close_sync()
    ghost.close_sync()
