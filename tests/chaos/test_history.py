"""The history checker over every backend: lease takeovers after a pause are excused only when
fencing rejected the stale writer; and the checker catches a planted bug (a release that skips
the owner check), so a green run means something."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from keylock import KeyedLock, LeaseLost
from keylock.backends import Backend, MemoryBackend
from keylock.backends.base import RW_LIMIT

from ..conftest import MakeBackend, PermitClients
from ._history import FencedStore, Grant, History, Write, believed_expiry
from ._report import Report, scaled

TTL = 0.08
PAUSE = 0.25  # a "GC pause" well past the TTL


async def _workload(clients: list[KeyedLock], history: History, rounds: int, seed: int) -> None:
    store = FencedStore(history)
    rng = random.Random(seed)

    async def worker(name: str, locks: KeyedLock) -> None:
        for i in range(rounds):
            lease = await locks.acquire("resource", timeout=30, ttl=TTL)
            now = time.monotonic()
            assert lease.expires_at is not None
            expires = now + (lease.expires_at - time.time())  # the backend's own expiry
            grant = history.granted(Grant("resource", lease.token, f"{name}#{i}", now, expires))
            store.write("resource", lease.token, grant.holder, i, time.monotonic())
            paused = rng.random() < 0.25
            await asyncio.sleep(PAUSE if paused else 0.002)
            store.write("resource", lease.token, grant.holder, i, time.monotonic())
            grant.released_at = time.monotonic()
            try:
                await lease.release()
            except LeaseLost:
                assert paused or lease.lost

    await asyncio.gather(*(worker(f"w{n}", locks) for n, locks in enumerate(clients)))


async def test_history_of_pauses_and_takeovers_is_clean(
    make_backend: MakeBackend, request: pytest.FixtureRequest, chaos_report: Report
) -> None:
    history = History()
    clients = [KeyedLock(make_backend(auto_renew=False), namespace="chaos") for _ in range(3)]
    rounds = scaled(6)
    await _workload(clients, history, rounds=rounds, seed=1)
    verdict = history.check()
    taken_over = sum(1 for w in history.writes if not w.accepted)
    chaos_report.record(
        "Holder paused past its TTL (in-process pause), others take over",
        request.node.callspec.params["make_backend"],
        verdict,
        trials=3 * rounds,
        notes=f"{taken_over} stale writes rejected by the fence",
    )
    assert verdict.grants == 3 * rounds
    assert verdict.ok, verdict


class _SkipsOwnerCheck(MemoryBackend):
    """Planted bug: release frees whatever lease holds the key, not just its own."""

    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        with self._mutex:
            entry = self._entries.get(key)
            if entry is not None:
                self._release_contended(key, entry)


async def test_checker_catches_a_release_that_skips_the_owner_check() -> None:
    history = History()
    backend = _SkipsOwnerCheck()
    await _workload([KeyedLock(backend) for _ in range(3)], history, rounds=10, seed=1)
    verdict = history.check()
    assert verdict.overlaps, "a stale release freed a live lease, and the checker missed it"


def test_checker_flags_token_regressions_and_stale_writes() -> None:
    history = History()
    store = FencedStore(history)
    history.granted(Grant("k", 5, "a", 1.0, None, released_at=2.0))
    history.granted(Grant("k", 4, "b", 3.0, None, released_at=4.0))  # token went backwards
    store.highest["k"] = 0
    history.wrote(Write("k", 4, "b", 3.5, True))
    verdict = history.check()
    assert verdict.token_regressions
    assert verdict.stale_writes_accepted


# ------------------------------------------------------------------------------- permits


def test_checker_counts_permits_against_the_limit() -> None:
    """Three overlapping permits fit a limit of 3; a fourth at once is an overlap."""
    history = History(limit=3)
    for n in range(3):
        history.granted(Grant("k", n + 1, f"h{n}", 1.0 + n / 10, None, released_at=5.0))
    assert history.check().ok
    history.granted(Grant("k", 9, "h9", 2.0, None, released_at=3.0))
    verdict = history.check()
    assert len(verdict.overlaps) == 1
    assert "4 leases of weight 4 > limit 3" in verdict.overlaps[0]
    assert "h9" in verdict.overlaps[0]


def test_checker_flags_a_writer_beside_a_reader_not_readers_together() -> None:
    limit = RW_LIMIT
    history = History(limit=limit)
    history.granted(Grant("doc", 1, "r1", 1.0, None, released_at=3.0))
    history.granted(Grant("doc", 2, "r2", 1.5, None, released_at=3.5))
    history.granted(Grant("doc", 3, "w", 4.0, None, released_at=5.0, weight=limit))
    history.granted(Grant("doc", 4, "r3", 5.0, None, released_at=6.0))  # after the writer
    assert history.check().ok
    history.granted(Grant("doc", 5, "w2", 5.5, None, released_at=7.0, weight=limit))
    verdict = history.check()
    assert len(verdict.overlaps) == 1
    assert "writer w2 beside others" in verdict.overlaps[0]


def test_checker_judges_permit_tokens_by_what_they_promise() -> None:
    """Shared holders may record their grants out of token order (not a regression); a reused
    token is, and so is a writer whose token is below one granted before it."""
    limit = RW_LIMIT
    history = History(limit=limit)
    history.granted(Grant("doc", 7, "r1", 1.0, None, released_at=3.0))
    history.granted(Grant("doc", 6, "r2", 1.5, None, released_at=3.0))  # recorded late: fine
    assert history.check().ok
    history.granted(Grant("doc", 5, "w", 4.0, None, released_at=5.0, weight=limit))
    history.granted(Grant("doc", 6, "r3", 6.0, None, released_at=7.0))
    found = history.check().token_regressions
    assert any("w's token 5 after 7" in f for f in found)
    assert any("token 6 granted to r2 and r3" in f for f in found)
    assert not any("granted after w's" in f for f in found)  # r3's 6 > w's 5


def test_checker_excuses_an_expired_permit_whose_writes_were_fenced_off() -> None:
    history = History(limit=2)
    history.granted(Grant("k", 1, "a", 1.0, 2.0))  # never released: expired at 2.0
    history.granted(Grant("k", 2, "b", 1.5, None, released_at=4.0))
    history.granted(Grant("k", 3, "c", 2.5, None, released_at=4.0))  # took a's room
    history.wrote(Write("k", 1, "a", 3.0, False))
    assert history.check().ok
    history.wrote(Write("k", 1, "a", 3.1, True))  # a's late write got through: not excused
    assert history.check().overlaps


async def _permit_workload(
    permits: PermitClients,
    history: History,
    rounds: int,
    seed: int,
    *,
    ttl: float | None = None,
    pauses: float = 0.0,
) -> int:
    """Two clients per mode (readers and writers for an RW key), three workers each; with
    *ttl*, a *pauses* share of holds sleep past it (a GC pause): others take the room over.
    Returns how many leases were lost."""
    rng = random.Random(seed)
    write = permits.limit == RW_LIMIT
    clients = [
        (KeyedLock(permits.make_shape(permits.limit, w, auto_renew=False)), w)
        for w in ([1, permits.limit] if write else [permits.weight])
        for _ in range(2)
    ]
    lost = 0

    async def worker(name: str, locks: KeyedLock, weight: int) -> None:
        nonlocal lost
        for i in range(rounds):
            lease = await locks.acquire("resource", timeout=30, ttl=ttl)
            now = time.monotonic()
            expires = None if ttl is None else believed_expiry(lease)
            grant = history.granted(
                Grant("resource", lease.token, f"{name}#{i}", now, expires, weight=weight)
            )
            paused = rng.random() < pauses
            await asyncio.sleep(PAUSE if paused else rng.random() * 0.002)
            grant.released_at = time.monotonic()
            try:
                await lease.release()
            except LeaseLost:
                # planned pauses, or an unplanned one: a loaded host delayed this task or its
                # release past the expiry (a permit handed over at a release starts with less
                # than its TTL left). The answer came after the expiry the holder believed,
                # never before: a permit is never lost while it had longer to live.
                answered_at = time.monotonic()
                assert paused or answered_at >= expires, (answered_at, expires)  # type: ignore[operator]
                lost += 1

    await asyncio.gather(
        *(worker(f"w{n}", locks, weight) for n, (locks, weight) in enumerate(clients * 3))
    )
    return lost


async def test_history_of_permits_is_clean(permits: PermitClients, chaos_report: Report) -> None:
    history = History(limit=permits.limit)
    rounds = scaled(8)
    await _permit_workload(permits, history, rounds=rounds, seed=2)
    verdict = history.check()
    trials = len(history.grants)
    chaos_report.record("Permits contended (no fault)", repr(permits), verdict, trials=trials)
    assert verdict.ok, verdict


async def test_history_of_permit_holders_paused_past_their_ttl(
    permits: PermitClients, chaos_report: Report
) -> None:
    """Holders of semaphore and RW permits freeze past their TTL: their room is taken over,
    their release raises LeaseLost, and live leases never weigh more than the limit."""
    history = History(limit=permits.limit)
    rounds = scaled(4)
    lost = await _permit_workload(permits, history, rounds, seed=4, ttl=TTL, pauses=0.25)
    verdict = history.check()
    chaos_report.record(
        "Permit holder paused past its TTL (in-process pause), others take over",
        repr(permits),
        verdict,
        trials=len(history.grants),
        notes=f"{lost} permits lost by a paused holder",
    )
    assert verdict.ok, verdict


class _OneTooMany(MemoryBackend):
    """Planted bug: its semaphores admit ``limit + 1`` holders (an off-by-one capacity)."""

    def permits(self, limit: int, weight: int = 1) -> Backend:
        return super().permits(limit + 1, weight)


async def test_checker_catches_a_semaphore_that_admits_one_too_many() -> None:
    history = History(limit=3)
    backend = _OneTooMany()
    await _permit_workload(PermitClients(lambda **_: backend, "sem3"), history, 10, seed=3)
    assert history.check().overlaps, "limit + 1 holders, and the checker missed it"
