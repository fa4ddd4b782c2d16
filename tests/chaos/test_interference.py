"""User code getting in the way, generated: observers and ``on_lost`` callbacks that raise at
random hooks, event loops blocked (``time.sleep``) at random points of holders and waiters,
and TTLs shortened with ``lease.extend(short)`` (rows 1, 4-6, 18 and 19 of the repro README).

Every holder writes to a fenced store under its token; the history checker then finds no
overlap between live leases, no stale write accepted, no token going back, and no wait that
outlived its timeout (by more than the longest block, which no library can undo). A waiter is
never handed a lease that is already lost, and nothing stays held afterwards.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from keylock import KeyedLock, Lease, LeaseLost, LockTimeout
from keylock.observe import Observer

from ..conftest import MakeBackend
from ._history import FencedStore, Grant, History, Wait, believed_expiry
from ._report import Report, scaled

BACKENDS = ["memory", "file", "redis"]
KEY = "busy"


@dataclass
class Outcome:
    """What the workers of one test saw besides the history."""

    returned_lost: list[str] = field(default_factory=list)  # acquire returned a lost lease
    escaped: list[str] = field(default_factory=list)  # a user hook's error reached the caller
    lost: int = 0  # leases that lapsed in the holder's hands (release said LeaseLost)


class NaiveStore(FencedStore):
    """The planted variant: a resource that skips the fence check (accepts every write)."""

    def write(self, resource: str, token: int, holder: str, value: object, at: float) -> bool:
        with self._mutex:
            from ._history import Write

            self._history.wrote(Write(resource, token, holder, at, True))
            return True


async def _woken(alarm: asyncio.Future[None]) -> float:
    """When this task resumed after *alarm* was set."""
    await alarm
    return time.monotonic()


async def hold_once(
    locks: KeyedLock,
    name: str,
    history: History,
    store: FencedStore,
    outcome: Outcome,
    rng: random.Random,
    *,
    ttl: float | None,
    timeout: float,
    block: Callable[[str], None] = lambda point: None,
    shorten_to: float | None = None,
) -> None:
    """Acquire KEY, write under the token, hold a little (blocking the loop where *block*
    says), write again and release; records the wait, the grant and every write."""
    block("before acquire")
    asked = time.monotonic()
    # A control woken by a timer for the same deadline, as the waiter's timeout wakes it: a
    # loop frozen by blocks (two can land back to back) resumes both late, and the waiter is
    # on time if it gives up within the slack of that control.
    loop = asyncio.get_running_loop()
    alarm: asyncio.Future[None] = loop.create_future()
    timer = loop.call_later(timeout, alarm.set_result, None)
    control = loop.create_task(_woken(alarm))
    try:
        lease = await locks.acquire(KEY, timeout=timeout, ttl=ttl)
    except LockTimeout:
        late = max(await control - (asked + timeout), 0.0)
        history.waited(Wait(KEY, name, asked + late, time.monotonic(), timeout, "timeout"))
        return
    except RuntimeError as exc:  # a hook's error that escaped
        outcome.escaped.append(f"{name} acquire: {exc!r}")
        return
    finally:
        if not alarm.done():
            timer.cancel()
            control.cancel()
    history.waited(Wait(KEY, name, asked, time.monotonic(), timeout, "granted"))
    if lease.lost:
        outcome.returned_lost.append(f"{name} token {lease.token}")
    grant = None
    try:
        if shorten_to is not None:
            await lease.extend(shorten_to)
        if store.write(KEY, lease.token, name, name, time.monotonic()):
            grant = history.granted(
                Grant(
                    KEY, lease.token, name, time.monotonic(), believed_expiry(lease), asked_at=asked
                )
            )
        block("holding")
        await asyncio.sleep(rng.random() * (3 * shorten_to if shorten_to else 0.003))
        store.write(KEY, lease.token, name, name, time.monotonic())
        block("before release")
    except LeaseLost:
        pass  # extend() on a lease that lapsed during a block: it says so
    finally:
        if grant is not None:
            grant.expires_at = believed_expiry(lease)  # its belief after the last renewal
            grant.released_at = time.monotonic()
        await _release(lease, name, outcome)


async def _release(lease: Lease, name: str, outcome: Outcome) -> None:
    try:
        await lease.release()
    except LeaseLost:
        outcome.lost += 1
    except RuntimeError as exc:
        outcome.escaped.append(f"{name} release: {exc!r}")


async def assert_free(locks: KeyedLock) -> None:
    """Nothing stays held: a fresh acquire gets KEY soon, and nobody waits afterwards."""
    lease = await locks.acquire(KEY, timeout=5)
    await lease.release()
    stats = locks.statistics(KEY)
    assert (stats.held, stats.waiting) == (False, 0), stats


# --------------------------------------------------------------------- observers that raise

HOOKS = ("acquired", "released", "timed_out", "lost", "renewed", "superseded", "coalesced")


class Flaky(Observer):
    """Raises RuntimeError from the hooks in *failing* (a random subset), half the time."""

    def __init__(self, rng: random.Random, failing: set[str]) -> None:
        self.rng = rng
        self.failing = failing
        self.raised = 0

    def _maybe(self, hook: str) -> None:
        if hook in self.failing and self.rng.random() < 0.5:
            self.raised += 1
            raise RuntimeError(f"observer {hook} failed")

    def acquired(self, prefix: str, waited: float, *, contended: bool | None) -> None:
        self._maybe("acquired")

    def released(self, prefix: str, held: float) -> None:
        self._maybe("released")

    def timed_out(self, prefix: str, waited: float) -> None:
        self._maybe("timed_out")

    def lost(self, prefix: str) -> None:
        self._maybe("lost")

    def renewed(self, prefix: str) -> None:
        self._maybe("renewed")

    def superseded(self, prefix: str) -> None:
        self._maybe("superseded")

    def coalesced(self, prefix: str) -> None:
        self._maybe("coalesced")


async def _observer_trial(
    make: MakeBackend, rng: random.Random, history: History, store: FencedStore, outcome: Outcome
) -> int:
    """3 clients with flaky observers and raising on_lost, 12 workers with short and long
    timeouts and TTLs that may lapse; returns how many hook calls raised."""
    observers = [Flaky(rng, set(rng.sample(HOOKS, rng.randint(1, len(HOOKS))))) for _ in range(3)]

    def on_lost(lease: Lease) -> None:
        raise RuntimeError("on_lost failed")

    clients = [KeyedLock(make(), observer=o, on_lost=on_lost) for o in observers]
    # None on Redis: its default (30 s), so a leak would show; 0.2 s may lapse when a hook's
    # traceback is logged on a loaded machine (50 ms lapsed between the grant and the caller)
    ttls = [None, 0.2, 2.0]
    await asyncio.gather(
        *(
            hold_once(
                clients[n % 3],
                f"w{n}",
                history,
                store,
                outcome,
                rng,
                ttl=rng.choice(ttls),
                timeout=rng.choice([0.01, 5.0]),
            )
            for n in range(12)
        )
    )
    await assert_free(KeyedLock(make()))
    return sum(o.raised for o in observers)


@pytest.mark.parametrize("make_backend", BACKENDS, indirect=True)
async def test_observers_raising_at_random_hooks(
    make_backend: MakeBackend, request: pytest.FixtureRequest, chaos_report: Report
) -> None:
    """Observers raising from a random subset of hooks, and an ``on_lost`` that raises: no
    error reaches the caller, no grant leaks (the key is free after each trial), no overlap.
    The planted naive variant (an observer called unguarded right after the grant, as row 18
    found) leaks the key and is caught: see the next test."""
    name = request.node.callspec.params["make_backend"]
    rng = random.Random(7)
    history, outcome = History(), Outcome()
    store = FencedStore(history)
    trials = scaled(4)
    raised = 0
    for _ in range(trials):
        raised += await _observer_trial(make_backend, rng, history, store, outcome)
    verdict = history.check()
    chaos_report.record(
        "Observers raising at random hooks",
        name,
        verdict,
        trials=trials,
        notes=f"{raised} hook calls raised; {len(outcome.escaped)} reached a caller; "
        f"{outcome.lost} leases lapsed in hand",
    )
    assert not outcome.escaped, outcome.escaped
    assert not outcome.returned_lost, outcome.returned_lost
    assert verdict.ok, verdict


async def test_observer_generator_catches_an_unguarded_hook(chaos_report: Report) -> None:
    """The planted variant: an acquire that calls ``observer.acquired`` unguarded after the
    grant leaks the key when the hook raises; the generator's free-key check catches it."""
    from keylock.backends import MemoryBackend

    locks = KeyedLock(MemoryBackend())
    observer = Flaky(random.Random(7), {"acquired"})
    stuck = 0
    for _ in range(8):
        try:
            lease = await locks.acquire(KEY, timeout=0.05)
        except LockTimeout:
            stuck += 1  # what the generator's free-key check reports
            continue
        try:
            observer.acquired("", 0.0, contended=False)  # the naive call: no guard
        except RuntimeError:
            continue  # the caller got the error; the grant stays held
        await lease.release()
    chaos_report.record(
        "Observers raising at random hooks",
        "memory, planted unguarded hook",
        History().check(),
        trials=8,
        notes=f"{observer.raised} raised; {stuck} later acquires found the key leaked (caught)",
    )
    assert stuck


# ------------------------------------------------------------------------ blocked event loops

BLOCK_POINTS = ("before acquire", "holding", "before release", "waiter loop")
TTL = 0.3
MAX_BLOCK = 2 * TTL


def _run_blocked_loops(
    make: MakeBackend, seed: int, history: History, store: FencedStore, outcome: Outcome
) -> int:
    """Two threads, each an event loop with its own client and 4 workers of 3 rounds; each
    loop is blocked (time.sleep up to 2 TTLs) at random points, also by a task of its own
    while its workers wait (a hand-off lands on a frozen loop). Returns the blocks made."""
    blocks = [0]
    mutex = threading.Lock()

    def loop_main(n: int) -> None:
        rng = random.Random(seed * 10 + n)

        def block(point: str) -> None:
            if rng.random() < 0.3:
                with mutex:
                    blocks[0] += 1
                time.sleep(rng.random() * MAX_BLOCK)

        async def blocker() -> None:
            for _ in range(4):
                await asyncio.sleep(rng.random() * TTL)
                block("waiter loop")

        async def main() -> None:
            locks = KeyedLock(make())
            jobs = [blocker()]
            for w in range(4):

                async def rounds(w: int = w) -> None:
                    for r in range(3):
                        await hold_once(
                            locks, f"l{n}w{w}r{r}", history, store, outcome, rng,
                            ttl=TTL, timeout=rng.choice([0.1, 3.0]), block=block,
                        )  # fmt: skip

                jobs.append(rounds())
            await asyncio.gather(*jobs)
            await locks.close()  # its connections belong to this loop

        asyncio.run(main())

    threads = [threading.Thread(target=loop_main, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a blocked loop never finished: hang"

    async def check() -> None:
        locks = KeyedLock(make())
        await assert_free(locks)
        await locks.close()

    asyncio.run(check())
    return blocks[0]


@pytest.mark.parametrize("make_backend", BACKENDS, indirect=True)
def test_event_loops_blocked_at_random_points(
    make_backend: MakeBackend, request: pytest.FixtureRequest, chaos_report: Report
) -> None:
    """Two event loops sharing a key, each frozen by ``time.sleep`` at random points: in a
    holder (before its acquire, while holding, before its release) and in a waiter's loop
    (during a hand-off). A lease that lapsed during a freeze is fenced off; a waiter never
    returns a lease that is already lost (on memory this failed before the driver's
    ``Backend._live`` check: 3 of 15 hand-offs to a frozen loop returned lost leases). The
    planted naive variant (a store without the fence check) is caught: see the next test."""
    name = request.node.callspec.params["make_backend"]
    history, outcome = History(), Outcome()
    trials = scaled(1)
    blocks = 0
    for trial in range(trials):
        blocks += _run_blocked_loops(make_backend, trial, history, FencedStore(history), outcome)
    verdict = history.check(slack=MAX_BLOCK + 1.0)
    chaos_report.record(
        "Event loops blocked at random points",
        name,
        verdict,
        trials=trials,
        notes=f"{blocks} blocks up to {MAX_BLOCK:g} s, TTL {TTL:g} s; "
        f"{outcome.lost} leases lapsed in a frozen holder",
    )
    assert not outcome.returned_lost, outcome.returned_lost
    assert verdict.ok, verdict


def test_blocked_loop_generator_catches_an_unfenced_store(chaos_report: Report) -> None:
    """The planted variant: with a store that skips the fence check, a holder frozen past
    its TTL writes after its successor, and the checker reports stale writes accepted."""
    from keylock.backends import MemoryBackend

    shared = MemoryBackend()
    history, outcome = History(), Outcome()
    _run_blocked_loops(lambda: shared, 0, history, NaiveStore(history), outcome)
    verdict = history.check(slack=MAX_BLOCK + 1.0)
    chaos_report.record(
        "Event loops blocked at random points",
        "memory, planted unfenced store",
        verdict,
        trials=1,
        notes="must show stale writes: the generator catches it",
    )
    assert verdict.stale_writes_accepted or verdict.overlaps


# ---------------------------------------------------------------------------- shortened TTLs


@pytest.mark.parametrize("make_backend", BACKENDS, indirect=True)
async def test_ttls_shortened_with_extend(
    make_backend: MakeBackend, request: pytest.FixtureRequest, chaos_report: Report
) -> None:
    """Holders take a 5 s lease, shorten it at once with ``extend(short)`` (250-600 ms: long
    enough that a loaded 2-core machine's stalls cannot starve a renewal due every third of
    it) and hold up to three times that. With auto-renew (Redis) the renewer follows the new length
    and no lease lapses (row 6); without it (memory, file) the short lease lapses, the next
    waiter takes over and the old holder's writes are fenced off. No planted variant here: a
    renewer that keeps its old schedule needs Redis internals; row 6's own test plants it."""
    name = request.node.callspec.params["make_backend"]
    rng = random.Random(13)
    history, outcome = History(), Outcome()
    store = FencedStore(history)
    clients = [KeyedLock(make_backend()) for _ in range(3)]
    trials = scaled(2)
    for _ in range(trials):
        await asyncio.gather(
            *(
                hold_once(
                    clients[n % 3],
                    f"w{n}",
                    history,
                    store,
                    outcome,
                    rng,
                    ttl=5.0,
                    timeout=30.0,
                    shorten_to=rng.uniform(0.25, 0.6),
                )
                for n in range(8)
            )
        )
        await assert_free(clients[0])
    verdict = history.check()
    chaos_report.record(
        "TTLs shortened with extend()",
        name,
        verdict,
        trials=trials,
        notes=f"{outcome.lost} of {8 * trials} shortened leases lapsed in hand"
        + (" (auto-renew follows extend)" if name == "redis" else " (no auto-renew)"),
    )
    if name == "redis":
        assert outcome.lost == 0  # the renewer kept every shortened lease
    assert not outcome.returned_lost, outcome.returned_lost
    assert verdict.ok, verdict
