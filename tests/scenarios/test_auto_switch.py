"""Incident 3, the auto-switch cascade: five failure handlers for one agent fire at once; each
reads the current subscription, awaits I/O, picks an alternative and restarts the agent.

Without keylock every handler switches: with three alternatives the agent is restarted five
times and hops A -> B -> C -> ... (the naive run below shows it). With ``stale_guard`` exactly one
switch happens and the rest are dropped as superseded.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from keylock import SUPERSEDED, KeyedLock, Superseded, stale_guard


class Agent:
    def __init__(self) -> None:
        self.subscription = "A"
        self.alternatives = ["A", "B", "C"]
        self.restarts: list[str] = []

    def current(self, agent_id: int, failed: str) -> str:
        return self.subscription

    async def switch(self, agent_id: int, failed: str) -> str:
        current = self.subscription  # read
        await asyncio.sleep(0.01)  # decide, with I/O in the middle
        choice = next(s for s in self.alternatives if s != current)
        self.alternatives.remove(current)
        self.alternatives.append(current)
        self.subscription = choice  # write
        self.restarts.append(choice)
        return choice


async def test_naive_handlers_cascade() -> None:
    agent = Agent()
    await asyncio.gather(*(agent.switch(42, "A") for _ in range(5)))
    assert len(agent.restarts) == 5  # the bug: five restarts for one failure


async def test_stale_guard_switches_exactly_once() -> None:
    agent = Agent()
    locks = KeyedLock()
    handler = stale_guard(
        locks, key=lambda agent_id, failed: f"agent:{agent_id}", snapshot=agent.current
    )(agent.switch)
    results = await asyncio.gather(*(handler(42, "A") for _ in range(5)))
    assert agent.restarts == ["B"]
    assert results.count(SUPERSEDED) == 4
    assert agent.subscription == "B"


async def test_burst_without_snapshot_is_handled_once() -> None:
    agent = Agent()
    locks = KeyedLock()
    handler = stale_guard(locks, key=lambda agent_id, failed: f"agent:{agent_id}")(agent.switch)
    results = await asyncio.gather(*(handler(42, "A") for _ in range(5)))
    assert len(agent.restarts) == 1
    assert results.count(SUPERSEDED) == 4
    # a failure arriving after the burst was handled is a new failure: it runs
    assert await handler(42, "B") != SUPERSEDED
    assert len(agent.restarts) == 2


async def test_on_stale_raise() -> None:
    agent = Agent()
    locks = KeyedLock()
    handler = stale_guard(
        locks,
        key=lambda agent_id, failed: f"agent:{agent_id}",
        snapshot=agent.current,
        on_stale="raise",
    )(agent.switch)
    results = await asyncio.gather(*(handler(7, "A") for _ in range(3)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, Superseded)]
    assert len(errors) == 2
    assert errors[0].key == "agent:7"
    assert len(agent.restarts) == 1


def test_sync_handlers_in_threads_switch_once() -> None:
    state = {"subscription": "A", "restarts": 0}
    locks = KeyedLock()

    @stale_guard(locks, key=lambda a: f"agent:{a}", snapshot=lambda a: state["subscription"])
    def on_failure(agent_id: int) -> None:
        current = state["subscription"]
        time.sleep(0.01)
        state["subscription"] = "B" if current == "A" else "C"
        state["restarts"] = int(state["restarts"]) + 1

    barrier = threading.Barrier(5)

    def fire() -> None:
        barrier.wait()
        on_failure(1)

    threads = [threading.Thread(target=fire) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert state == {"subscription": "B", "restarts": 1}


@pytest.mark.parametrize("bad", ["sometimes"])
def test_on_stale_is_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="on_stale"):
        stale_guard(KeyedLock(), key=lambda: "k", on_stale=bad)  # type: ignore[arg-type]
