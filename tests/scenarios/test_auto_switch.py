"""Incident 3, the auto-switch cascade.

An agent runs on subscription A and has three alternatives (B, C, D). When its subscription
fails, five failure handlers fire for the same agent at once. Each reads the agent's current
subscription, awaits (a health check: simulated I/O), picks the next alternative and restarts
the agent on it.

How it fails without keylock: every handler reads A before any of them writes, so all five
restart the agent (five restarts for one failure: ``["B"] * 5``). A per-agent lock alone does
not fix it: the handlers then run one after another, each reads the subscription the previous
one just switched to, takes it for the failed one and switches again: the cascade
A -> B -> C -> D -> A -> B. ``stale_guard`` fixes both: the snapshot taken at entry (A) no
longer matches under the lock (B), so four handlers are dropped and exactly one switch happens.
The naive and lock-only runs below use the same handler and the same harness, and are asserted
to go wrong; the interleaving is forced by the event loop's FIFO scheduling (every handler
yields between its read and its write) or, for threads, by a barrier.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

from keylock import SUPERSEDED, KeyedLock, Lease, Superseded, stale_guard

SUBSCRIPTIONS = ["A", "B", "C", "D"]  # the current one and three alternatives
HANDLERS = 5
AGENT = 42


def next_alternative(current: str) -> str:
    return SUBSCRIPTIONS[(SUBSCRIPTIONS.index(current) + 1) % len(SUBSCRIPTIONS)]


class Fleet:
    """The agents' store; every access is a round trip (a yield to the event loop)."""

    def __init__(self) -> None:
        self.subscription = {AGENT: "A"}
        self.restarts: list[str] = []  # the side effect that must happen once per failure

    async def read(self, agent_id: int) -> str:
        await asyncio.sleep(0)
        return self.subscription[agent_id]

    async def restart(self, agent_id: int, subscription: str) -> None:
        await asyncio.sleep(0)
        self.subscription[agent_id] = subscription
        self.restarts.append(subscription)

    # the same two operations for threads
    def read_sync(self, agent_id: int) -> str:
        return self.subscription[agent_id]

    def restart_sync(self, agent_id: int, subscription: str) -> None:
        self.subscription[agent_id] = subscription
        self.restarts.append(subscription)


def make_handler(fleet: Fleet) -> Callable[[int, str], Awaitable[str]]:
    """The failure handler as written by hand: read -> await -> decide -> restart."""

    async def on_failure(agent_id: int, failed: str) -> str:
        current = await fleet.read(agent_id)
        for _ in range(3):  # health checks of the alternatives
            await asyncio.sleep(0)
        choice = next_alternative(current)
        await fleet.restart(agent_id, choice)
        return choice

    return on_failure


async def burst(handler: Callable[[int, str], Awaitable[object]]) -> list[object]:
    """The harness: five concurrent failure events for one agent whose subscription A failed."""
    return await asyncio.gather(*(handler(AGENT, "A") for _ in range(HANDLERS)))


def agent_key(agent_id: int, failed: str) -> str:
    return f"agent:{agent_id}"


# ------------------------------------------------------------------------ without keylock


async def test_naive_handlers_all_restart_the_agent() -> None:
    fleet = Fleet()
    await burst(make_handler(fleet))
    assert fleet.restarts == ["B"] * HANDLERS  # the bug: five restarts for one failure


async def test_a_lock_alone_cascades() -> None:
    fleet = Fleet()
    locks = KeyedLock()
    handler = locks.locked(key=agent_key)(make_handler(fleet))
    await burst(handler)
    assert fleet.restarts == ["B", "C", "D", "A", "B"]  # the cascade A -> B -> C -> ...


# --------------------------------------------------------------------------- with keylock


async def test_stale_guard_with_a_snapshot_switches_exactly_once() -> None:
    fleet = Fleet()
    locks = KeyedLock()
    handler = stale_guard(
        locks,
        key=agent_key,
        snapshot=lambda agent_id, failed: fleet.read(agent_id),  # an async snapshot
    )(make_handler(fleet))
    results = await burst(handler)
    assert fleet.restarts == ["B"]
    assert fleet.subscription[AGENT] == "B"
    assert results.count("B") == 1
    assert results.count(SUPERSEDED) == HANDLERS - 1
    assert len(locks.backend) == 0  # type: ignore[arg-type]
    # a failure of B, reported after the switch, is a new failure: it is handled
    assert await handler(AGENT, "B") == "C"
    assert fleet.restarts == ["B", "C"]


async def test_stale_guard_without_a_snapshot_handles_the_burst_once() -> None:
    fleet = Fleet()
    locks = KeyedLock()
    handler = stale_guard(locks, key=agent_key)(make_handler(fleet))
    results = await burst(handler)
    assert fleet.restarts == ["B"]
    assert results.count(SUPERSEDED) == HANDLERS - 1
    # a failure arriving after the burst was handled is handled too
    assert await handler(AGENT, "B") == "C"
    assert fleet.restarts == ["B", "C"]


async def test_stale_guard_on_stale_raise() -> None:
    fleet = Fleet()
    locks = KeyedLock()
    handler = stale_guard(
        locks,
        key=agent_key,
        snapshot=lambda agent_id, failed: fleet.read(agent_id),
        on_stale="raise",
    )(make_handler(fleet))
    results = await asyncio.gather(
        *(handler(AGENT, "A") for _ in range(HANDLERS)), return_exceptions=True
    )
    assert results.count("B") == 1
    errors = [r for r in results if isinstance(r, Superseded)]
    assert len(errors) == HANDLERS - 1
    assert all(error.key == f"agent:{AGENT}" for error in errors)
    assert fleet.restarts == ["B"]


# ------------------------------------------------------------------------------- threads


def make_sync_handler(fleet: Fleet, hop: Callable[[], object]) -> Callable[[int, str], str]:
    def on_failure(agent_id: int, failed: str) -> str:
        current = fleet.read_sync(agent_id)
        hop()  # the health checks
        choice = next_alternative(current)
        fleet.restart_sync(agent_id, choice)
        return choice

    return on_failure


def thread_burst(handler: Callable[[int, str], object]) -> list[object]:
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(handler(AGENT, "A")))
        for _ in range(HANDLERS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == HANDLERS
    return results


def test_naive_sync_handlers_in_threads_all_restart_the_agent() -> None:
    fleet = Fleet()
    everyone_read = threading.Barrier(HANDLERS, timeout=10)  # forces the interleaving
    thread_burst(make_sync_handler(fleet, everyone_read.wait))
    assert fleet.restarts == ["B"] * HANDLERS


def test_stale_guard_on_sync_handlers_in_threads_switches_exactly_once() -> None:
    fleet = Fleet()
    locks = KeyedLock()
    handler = stale_guard(
        locks, key=agent_key, snapshot=lambda agent_id, failed: fleet.read_sync(agent_id)
    )(make_sync_handler(fleet, lambda: time.sleep(0.001)))
    # hold the agent's lock until all five handlers took their snapshot and queued, so they
    # truly contend (else a late thread could start after the switch: a new failure)
    gate = locks.acquire_sync(f"agent:{AGENT}")
    opener = threading.Thread(target=_release_when_queued, args=(locks, gate))
    opener.start()
    results = thread_burst(handler)
    opener.join(10)
    assert fleet.restarts == ["B"]
    assert results.count(SUPERSEDED) == HANDLERS - 1
    assert len(locks.backend) == 0  # type: ignore[arg-type]


def test_stale_guard_without_a_snapshot_on_threads_handles_the_burst_once() -> None:
    fleet = Fleet()
    locks = KeyedLock()
    handler = stale_guard(locks, key=agent_key)(make_sync_handler(fleet, lambda: None))
    gate = locks.acquire_sync(f"agent:{AGENT}")
    opener = threading.Thread(target=_release_when_queued, args=(locks, gate))
    opener.start()
    results = thread_burst(handler)
    opener.join(10)
    assert fleet.restarts == ["B"]
    assert results.count(SUPERSEDED) == HANDLERS - 1


def _release_when_queued(locks: KeyedLock, gate: Lease) -> None:
    deadline = time.monotonic() + 10
    while locks.statistics(f"agent:{AGENT}").waiting < HANDLERS and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.release_sync()


# --------------------------------------------------------------- a late event (issue 11.6)


async def test_a_late_failure_is_dropped_with_expected() -> None:
    """A failure of A reported after the switch to B (an event that arrives late, e.g. from a
    slow queue). The entry-snapshot form reads B at entry and B under the lock and switches
    again (B -> C: the cascade the README's pattern still let through); ``expected=`` compares
    what the event saw (A) with the state under the lock (B) and drops it."""
    fleet = Fleet()
    locks = KeyedLock()
    entry_only = stale_guard(
        locks, key=agent_key, snapshot=lambda agent_id, failed: fleet.read(agent_id)
    )(make_handler(fleet))
    assert await entry_only(AGENT, "A") == "B"
    assert await entry_only(AGENT, "A") == "C"  # the late event switched a healthy agent
    fleet = Fleet()
    handler = stale_guard(
        locks,
        key=agent_key,
        expected=lambda agent_id, failed: failed,
        snapshot=lambda agent_id, failed: fleet.read(agent_id),
    )(make_handler(fleet))
    assert (await burst(handler)).count("B") == 1  # the burst: one switch
    assert await handler(AGENT, "A") is SUPERSEDED  # the late event: dropped
    assert fleet.restarts == ["B"]
    assert await handler(AGENT, "B") == "C"  # B failing is a new failure
    assert fleet.restarts == ["B", "C"]
