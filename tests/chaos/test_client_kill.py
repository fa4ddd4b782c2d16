"""``CLIENT KILL`` of a client's connections while its leases are renewed and released.

A killer thread asks the server to close the chosen connections (by name, via ``CLIENT LIST``
and ``CLIENT KILL ID``) every few milliseconds. A lease is then either renewed or released as
asked, or reported lost (``on_lost``, ``LeaseLost``), or its release fails clearly
(``BackendUnavailable``) and the key frees itself at the TTL: no key stays stuck past it, no
two holders overlap (the history checker), no phantom grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import redis
import redis.asyncio

from keylock import BackendUnavailable, KeyedLock, Lease, LeaseLost, LockTimeout
from keylock.backends import RedisBackend
from keylock.backends._renewer import Renewal

from .._redis_server import Server
from ._history import Grant, History, RedisFencedStore, Wait, believed_expiry
from ._proxy import Proxy
from ._report import Report, scaled

TTL = 0.6


@pytest.fixture
def server(redis_server: Server) -> Server:
    redis_server.flush()
    return redis_server


@pytest.fixture
async def store(server: Server) -> AsyncIterator[RedisFencedStore]:
    fenced = RedisFencedStore(History(), server.url)
    yield fenced
    await fenced.aclose()


class Killer:
    """A thread closing, every 1 ms to *every* seconds, one connection (at random) among those
    whose name starts with *prefix* (pub/sub connections spared: the listener is not what is
    under test)."""

    def __init__(self, url: str, prefix: str, *, every: float, seed: int) -> None:
        self._client = redis.Redis.from_url(url)
        self._prefix = prefix
        self._every = every
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self.kills = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._rng.uniform(0.001, self._every)):
            victims = [
                client["id"]
                for client in self._client.client_list()
                if client["name"].startswith(self._prefix) and client["sub"] == "0"
            ]
            if victims:
                self.kills += self._client.client_kill_filter(_id=self._rng.choice(victims))

    @contextlib.contextmanager
    def running(self) -> Iterator[Killer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)
            self._client.close()


class _Counting(RedisBackend):
    """RedisBackend counting the renewals that failed in flight (test instrumentation)."""

    failed_renewals = 0

    def _renewal(self) -> Renewal:
        renew = super()._renewal()

        def counting(batch: list[tuple[str, bytes, float]]) -> list[object]:
            try:
                return renew(batch)
            except BackendUnavailable:
                self.failed_renewals += 1
                raise

        return counting


@dataclass
class _Tally:
    kept: int = 0
    lost: int = 0
    failed_renewals: int = 0
    kills: int = 0
    phantoms: list[str] = field(default_factory=list)


async def _renewal_trial(
    server: Server,
    proxy: Proxy,
    store: RedisFencedStore,
    history: History,
    tally: _Tally,
    *,
    every: float,
    seed: int,
    trial: int,
) -> None:
    """Three holders, a contender, and a killer of the holders' renewer connections."""
    lost_calls: list[Lease] = []
    backends = [
        _Counting(
            redis.Redis.from_url(proxy.url, client_name=f"renewer-{i}"),
            async_client=redis.asyncio.Redis.from_url(server.url, client_name=f"h-{i}"),
            ttl=TTL,
        )
        for i in range(3)
    ]
    holders = [KeyedLock(b, namespace="kill", on_lost=lost_calls.append) for b in backends]
    contender = KeyedLock(RedisBackend.from_url(server.url, ttl=TTL), namespace="kill")
    done = asyncio.Event()
    leases: dict[int, Lease] = {}

    async def hold(i: int) -> None:
        key = f"k{i}"
        lease = leases[i] = await holders[i].acquire(key, timeout=5)
        assert await store.write(key, lease.token, f"holder{i}", "claim")
        grant = history.granted(
            Grant(key, lease.token, f"holder{i}#{trial}", time.monotonic(), None)
        )
        until = time.monotonic() + 4 * TTL
        while time.monotonic() < until:  # the section: writes, through the renewals
            await store.write(key, lease.token, grant.holder, "work")
            await asyncio.sleep(0.05)
        grant.expires_at = believed_expiry(lease)
        grant.released_at = time.monotonic()
        try:
            await lease.release()
            tally.kept += 1
            assert lease not in lost_calls
        except LeaseLost:
            tally.lost += 1
            assert lost_calls.count(lease) == 1

    async def contend(i: int) -> None:
        key = f"k{i}"
        while not done.is_set():
            try:
                got = await contender.acquire(key, timeout=0)
            except LockTimeout:
                await asyncio.sleep(0.01)
                continue
            claimed = await store.write(key, got.token, "contender", "claim")
            holder = leases.get(i)
            if holder is not None and not (holder.released or holder.lost):
                tally.phantoms.append(f"{key}: {got.token} granted, {holder.token} believed")
            grant = history.granted(
                Grant(key, got.token, f"contender#{trial}", time.monotonic(), None)
            )
            assert claimed
            await asyncio.sleep(0.01)
            grant.released_at = time.monotonic()
            await got.release()

    killer = Killer(server.url, "renewer-", every=every, seed=seed)
    with killer.running():
        contenders = [asyncio.create_task(contend(i)) for i in range(3)]
        await asyncio.gather(*(hold(i) for i in range(3)))
        done.set()
        await asyncio.gather(*contenders)
    tally.kills += killer.kills
    tally.failed_renewals += sum(b.failed_renewals for b in backends)
    for i in range(3):  # nothing stuck: each key is free at once, or within a TTL
        asked = time.monotonic()
        again = await contender.acquire(f"k{i}", timeout=TTL + 1)
        history.waited(Wait(f"k{i}", "after", asked, time.monotonic(), TTL + 1, "granted"))
        await again.release()
    for locks in (*holders, contender):
        await locks.close()


@pytest.mark.parametrize("every", [0.03, 0.3], ids=["kills-every-1-30ms", "kills-every-1-300ms"])
async def test_client_kill_mid_renewal(
    server: Server, store: RedisFencedStore, chaos_report: Report, every: float
) -> None:
    """Three holders keep a key each for several TTLs while their renewer's connection is
    killed at random (through the proxy with 20 ms of delay, so a kill often lands while a
    renewal is in flight; a fresh connection costs redis-py four round trips, 80 ms, so kills
    every 15 ms on average starve every renewal, and kills every 150 ms let most through); a
    contender tries each key every 10 ms. Each lease ends renewed (its release works) or
    reported lost (``on_lost`` ran once, release raised LeaseLost); the contender gets a key
    only from a holder that knows its lease is gone, and a holder's write after that is
    rejected; each key is free within a TTL of its release. A renewer that kept believing in a
    lease after a failed renewal fails the phantom check (see the control in test_network)."""
    history = History()
    store._history = history
    rng = random.Random(7)
    trials = scaled(1)
    tally = _Tally()
    with Proxy(server.port) as proxy:
        proxy.set(up_delay=0.02)  # each renewal is in flight for 20 ms: kills land mid-way
        trial = 0
        # Random kills every 150 ms on average land inside a 20 ms renewal only now and then
        # (no kill did in about one trial in six on a loaded machine): more trials, bounded,
        # until one did, so the checks below always see renewals cut in flight.
        while trial < trials or (tally.failed_renewals == 0 and trial < trials + 5):
            seed = rng.randrange(1 << 30)
            await _renewal_trial(
                server, proxy, store, history, tally, every=every, seed=seed, trial=trial
            )
            trial += 1
        trials = trial
    verdict = history.check()
    chaos_report.record(
        "CLIENT KILL mid-renewal",
        f"redis, renewer connection killed every 1-{every * 1000:.0f} ms",
        verdict,
        trials=3 * trials,
        notes=f"{tally.kills} kills, {tally.failed_renewals} renewals cut in flight; "
        f"{tally.kept} leases kept, {tally.lost} reported lost",
    )
    assert tally.phantoms == []
    assert verdict.ok, verdict
    assert tally.kept + tally.lost == 3 * trials
    assert tally.failed_renewals > 0  # the kills did land mid-renewal


@pytest.mark.parametrize("retrying", [False, True], ids=["default-client", "retry-on-error"])
async def test_client_kill_mid_release(
    server: Server, store: RedisFencedStore, chaos_report: Report, retrying: bool
) -> None:
    """Four workers on two clients take one key in turn while their connections are killed
    every 50 ms on average (through the proxy with 5 ms of delay, so kills land while an
    acquire or a release is in flight). A release ends released, or fails clearly:
    BackendUnavailable (the key then frees itself at its TTL), or, when redis-py retries on
    connection errors, LeaseLost (the retry found the first attempt had released it). No
    overlap, no stale write, and no key stays stuck: the longest gap between a holder's end
    and the next grant stays under a TTL plus the time a cut-off waiter keeps its place.
    A lease without a TTL would stay stuck after a failed release (the hand-off bound fails);
    no planted bug here: the checker's grip on such histories is shown in test_history and
    test_network.

    With redis-py's defaults (no retry on connection errors, and the asyncio pool hands out a
    connection the server closed while it sat idle), nearly every call after a kill fails:
    few grants, many clear errors, and nothing worse. With ``retry_on_error`` the kills are
    mostly invisible."""
    history = History()
    store._history = history
    rng = random.Random(13)
    duration = 2.0 * scaled(1)
    options: dict[str, object] = {"retry_on_error": [redis.ConnectionError]} if retrying else {}
    outcomes = {"released": 0, "LeaseLost": 0, "BackendUnavailable": 0}
    with Proxy(server.port) as proxy:
        proxy.set(up_delay=0.005)
        clients = [
            KeyedLock(
                RedisBackend(
                    redis.Redis.from_url(server.url),  # the renewer's: not under test
                    async_client=redis.asyncio.Redis.from_url(
                        proxy.url, client_name=f"rel-{name}", **options
                    ),
                    ttl=TTL,
                    poll=0.2,
                ),
                namespace="kill",
            )
            for name in "ab"
        ]
        stop = time.monotonic() + duration

        async def worker(n: int) -> None:
            locks = clients[n % 2]
            i = 0
            while time.monotonic() < stop:
                i += 1
                asked = time.monotonic()
                try:
                    lease = await locks.acquire("res", timeout=2.0)
                except (BackendUnavailable, LockTimeout) as exc:
                    outcome = "error" if isinstance(exc, BackendUnavailable) else "timeout"
                    history.waited(Wait("res", f"w{n}", asked, time.monotonic(), 2.0, outcome))
                    continue
                history.waited(Wait("res", f"w{n}", asked, time.monotonic(), 2.0, "granted"))
                holder = f"w{n}#{i}"
                assert await store.write("res", lease.token, holder, "claim") or lease.lost
                grant = history.granted(
                    Grant("res", lease.token, holder, time.monotonic(), None, asked_at=asked)
                )
                await asyncio.sleep(rng.random() * 0.01)
                await store.write("res", lease.token, holder, "done")
                grant.expires_at = believed_expiry(lease)
                grant.released_at = time.monotonic()
                try:
                    await lease.release()
                    outcomes["released"] += 1
                except (LeaseLost, BackendUnavailable) as exc:
                    outcomes[type(exc).__name__] += 1

        killer = Killer(server.url, "rel-", every=0.1, seed=rng.randrange(1 << 30))
        with killer.running():
            await asyncio.gather(*(worker(n) for n in range(4)))
        asked = time.monotonic()
        with contextlib.suppress(BackendUnavailable):  # a connection killed at the very end
            await (await clients[0].acquire("res", timeout=TTL + 2)).release()
        lease = await clients[0].acquire("res", timeout=TTL + 2)  # not stuck
        history.waited(Wait("res", "after", asked, time.monotonic(), TTL + 2, "granted"))
        await lease.release()
        for locks in clients:
            await locks.close()
    verdict = history.check()
    chaos_report.record(
        "CLIENT KILL mid-release",
        f"redis, {'retry_on_error' if retrying else 'default'} client, kills every 1-100 ms",
        verdict,
        trials=killer.kills,
        notes="trials = kills; releases: " + ", ".join(f"{n} {k}" for k, n in outcomes.items()),
    )
    assert verdict.ok, verdict
    assert verdict.grants >= 1
    if verdict.max_handoff is not None:  # a TTL, a cut-off waiter's place in line, a margin
        assert verdict.max_handoff < TTL + (3 * 0.2 + 1) + 0.5
    if retrying:  # the retries carry most calls through the kills
        assert outcomes["released"] > 0
