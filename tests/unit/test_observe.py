"""Observability hooks: what each event reports, and that an unobserved lock runs no hook."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading

import pytest

from keylock import (
    SUPERSEDED,
    Counters,
    KeyedLock,
    LeaseLost,
    LockTimeout,
    Observer,
    SingleFlight,
    stale_guard,
)
from keylock._holds import AsyncHold, SyncHold
from keylock._observed import _ObservedAsync, _ObservedSync


class _Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def acquired(self, prefix: str, waited: float, *, contended: bool | None) -> None:
        self.events.append(("acquired", prefix, contended))

    def released(self, prefix: str, held: float) -> None:
        self.events.append(("released", prefix))

    def timed_out(self, prefix: str, waited: float) -> None:
        self.events.append(("timed_out", prefix))

    def lost(self, prefix: str) -> None:
        self.events.append(("lost", prefix))

    def superseded(self, prefix: str) -> None:
        self.events.append(("superseded", prefix))

    def coalesced(self, prefix: str) -> None:
        self.events.append(("coalesced", prefix))


async def test_acquire_release_timeout_and_handoff_are_reported() -> None:
    recorder = _Recorder()
    locks = KeyedLock(observer=recorder)
    holder = await locks.acquire("agent:1")
    waiter = asyncio.create_task(locks.acquire("agent:1"))
    await asyncio.sleep(0)
    with pytest.raises(LockTimeout):
        await locks.acquire("agent:1", timeout=0)
    await holder.release()
    second = await waiter
    await second.release()
    with locks.sync("job:9"):
        pass
    assert recorder.events == [
        ("acquired", "agent", False),
        ("timed_out", "agent"),
        ("released", "agent"),
        ("acquired", "agent", True),  # it queued: a hand-off
        ("released", "agent"),
        ("acquired", "job", False),
        ("released", "job"),
    ]


async def test_lost_leases_superseded_and_coalesced_calls_are_reported() -> None:
    counters = Counters()
    locks = KeyedLock(observer=counters)
    lease = await locks.acquire("lease:1", ttl=0.05)
    await asyncio.sleep(0.1)
    with pytest.raises(LeaseLost):
        await lease.release()

    calls = 0

    @stale_guard(locks, key=lambda n: f"guard:{n}", snapshot=lambda n: calls)
    async def handler(n: int) -> int:
        return n

    async def bump_then_call() -> object:
        nonlocal calls
        async with locks("guard:1"):
            task = asyncio.create_task(handler(1))  # snapshots `calls`, then queues
            await asyncio.sleep(0.01)
            calls += 1  # the situation changes while it waits
        return await task

    assert await bump_then_call() is SUPERSEDED

    flight = SingleFlight(observer=counters)

    async def slow() -> int:
        await asyncio.sleep(0.01)
        return 1

    assert await asyncio.gather(*(flight.do("user:1", slow) for _ in range(5))) == [1] * 5

    stats = counters.snapshot()
    assert stats["lease"].lost == 1
    assert stats["lease"].acquired == 1
    assert stats["lease"].released == 1
    assert stats["guard"].superseded == 1
    assert stats["user"].coalesced == 4
    assert stats["lease"].hold_seconds > 0


def test_unobserved_locks_use_the_plain_hold() -> None:
    """Zero cost when nobody listens: the observed subclass is chosen at construction."""
    assert type(KeyedLock()("k")) is AsyncHold
    assert type(KeyedLock().sync("k")) is SyncHold
    assert type(KeyedLock(observer=Counters())("k")) is _ObservedAsync
    assert type(KeyedLock(observer=Counters()).sync("k")) is _ObservedSync


def test_an_observer_that_overrides_no_block_hook_costs_nothing_there() -> None:
    """Issue 15, item 2: a no-op ``Observer()`` (or one that only counts losses) made every
    acquire+release run the observed path: +133% instructions (callgrind) for nothing. It
    now gets the plain hold; one that overrides any acquire/release/timeout hook, on its class
    or on the instance, still gets the observed one."""
    assert type(KeyedLock(observer=Observer())("k")) is AsyncHold
    assert type(KeyedLock(observer=Observer()).sync("k")) is SyncHold

    class LossesOnly(Observer):
        def lost(self, prefix: str) -> None:
            pass

    assert type(KeyedLock(observer=LossesOnly())("k")) is AsyncHold
    patched = Observer()
    patched.released = lambda prefix, held: None  # type: ignore[method-assign]
    assert type(KeyedLock(observer=patched)("k")) is _ObservedAsync


async def test_each_release_is_reported_once_on_the_fast_and_the_slow_exit() -> None:
    """The observed block reports its release on the fast exit (no coroutine) and through
    release() on the slow one (a TTL, an explicit release): once each, never twice."""
    recorder = _Recorder()
    locks = KeyedLock(observer=recorder)
    async with locks("a:1"):
        pass
    async with locks("a:2", ttl=5):
        pass
    lease = await locks.acquire("a:3")
    await lease.release()

    def blocks() -> None:
        with locks.sync("a:4"):
            pass
        with locks.sync("a:5", ttl=5):
            pass

    await asyncio.to_thread(blocks)
    with pytest.raises(KeyError):
        async with locks("a:6"):
            raise KeyError("body")
    released = [event for event in recorder.events if event[0] == "released"]
    assert released == [("released", "a")] * 6


class _ThroughTheHooks(Counters):
    """Counters that only calls up: its blocks are counted through the hooks."""

    def acquired(self, prefix: str, waited: float, *, contended: bool | None) -> None:
        super().acquired(prefix, waited, contended=contended)

    def released(self, prefix: str, held: float) -> None:
        super().released(prefix, held)


async def test_counters_count_a_block_alike_inline_and_through_the_hooks() -> None:
    """Issue 15, item 2: a block granted at once on a lock observed by a plain Counters is
    counted into the thread's counters without calling ``acquired``/``released``. Every kind
    of block (at once, handed off, timed out, released explicitly, with a TTL, a body that
    raises, sync in a thread) counts exactly as it does through the hooks."""
    from keylock.observe import BlockHooks

    async def run(counters: Counters) -> dict[str, tuple[object, ...]]:
        locks = KeyedLock(observer=counters)
        for i in range(3):  # the first block of a group on a thread goes through the hook
            async with locks(f"a:{i}") as lease:
                assert isinstance(lease, _ObservedAsync)
                inline = lease._stats is not None
                assert inline == (i > 0 and type(counters) is Counters)
        holder = await locks.acquire("a:1")
        waiter = asyncio.create_task(locks.acquire("a:1"))
        await asyncio.sleep(0)
        with pytest.raises(LockTimeout):
            await locks.acquire("a:1", timeout=0)
        await holder.release()
        await (await waiter).release()
        async with locks("b:1", ttl=5):
            pass
        with pytest.raises(KeyError):
            async with locks("b:2"):
                raise KeyError("body")

        def blocks() -> None:
            for i in range(3):
                with locks.sync(f"c:{i}"):
                    pass

        await asyncio.to_thread(blocks)
        return {
            group: (s.acquired, s.contended, s.released, s.timed_out, s.wait_seconds > 0)
            for group, s in counters.snapshot().items()
        }

    plain, hooked = Counters(), _ThroughTheHooks()
    assert BlockHooks(plain).tallies is not None
    assert BlockHooks(hooked).tallies is None
    counted = await run(plain)
    assert counted == await run(hooked)
    assert counted == {
        "a": (5, 1, 5, 1, True),
        "b": (2, 0, 2, 0, False),
        "c": (3, 0, 3, 0, False),
    }
    assert all(s.hold_seconds > 0 for s in plain.snapshot().values())


def test_otel_adapter_records_metrics() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from keylock.otel import OTelObserver

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    locks = KeyedLock(observer=OTelObserver(provider.get_meter("test")))
    for _ in range(3):
        with locks.sync("agent:7"):
            pass
    data = reader.get_metrics_data()
    assert data is not None
    metrics = {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    acquired = metrics["keylock.acquired"].data.data_points[0]
    assert acquired.value == 3
    assert dict(acquired.attributes) == {"keylock.prefix": "agent"}
    assert metrics["keylock.hold"].data.data_points[0].count == 3
    provider.shutdown()


def test_counters_from_many_threads_add_up_and_outlive_their_threads() -> None:
    """Issue 15, item 2: Counters took a mutex per event (+113% instructions on an uncontended
    acquire+release). Each thread now counts into a tally of its own without a lock; threads
    switching every microsecond lose no event, and what a thread counted stays counted (and
    its tally is retired, not kept) once it ends."""
    counters = Counters()
    locks = KeyedLock(observer=counters)

    def work(n: int) -> None:
        for i in range(2_000):
            with locks.sync(f"job:{n}:{i % 3}"):
                pass

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    gc.collect()
    job = counters.snapshot()["job"]
    assert (job.acquired, job.released, job.contended) == (16_000, 16_000, 0)
    assert job.wait_seconds == 0.0  # granted at once: no wait is reported
    assert job.hold_seconds > 0
    assert counters._tallies == []  # every thread ended: their counts are in the retired total
    counters.reset()
    assert counters.snapshot() == {}
