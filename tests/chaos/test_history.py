"""The history checker over every backend: lease takeovers after a pause are excused only when
fencing rejected the stale writer; and the checker catches a planted bug (a release that skips
the owner check), so a green run means something."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from keylock import KeyedLock, LeaseLost
from keylock.backends import MemoryBackend

from ..conftest import MakeBackend
from ._history import FencedStore, Grant, History, Write
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
