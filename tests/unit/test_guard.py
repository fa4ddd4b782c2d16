"""stale_guard: SUPERSEDED, snapshot mode, the "completed after you arrived" mode, logging."""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import math
import pickle
import threading
import time

import pytest

import keylock
from keylock import SUPERSEDED, KeyedLock, Superseded, stale_guard
from keylock.backends import MemoryBackend


async def _until(predicate: object, rounds: int = 1000) -> None:
    """Yield to the loop until *predicate()* holds (a bounded number of rounds)."""
    for _ in range(rounds):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def _completions(handler: object) -> dict[str, list[int]]:
    """The guard's per-key bookkeeping (for leak checks)."""
    nonlocals = inspect.getclosurevars(handler).nonlocals  # type: ignore[arg-type]
    return nonlocals["completions"]._keys  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ SUPERSEDED


def test_superseded_is_a_falsy_singleton_with_a_repr() -> None:
    assert not SUPERSEDED
    assert bool(SUPERSEDED) is False
    assert repr(SUPERSEDED) == "keylock.SUPERSEDED"
    assert type(SUPERSEDED)() is SUPERSEDED
    assert copy.copy(SUPERSEDED) is SUPERSEDED
    assert copy.deepcopy(SUPERSEDED) is SUPERSEDED
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(SUPERSEDED, protocol)) is SUPERSEDED


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="on_stale"):
        stale_guard(KeyedLock(), key=lambda: "k", on_stale="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key"):
        stale_guard(KeyedLock(), key="fixed")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- snapshot mode


class Subscription:
    def __init__(self) -> None:
        self.current = "A"
        self.switches: list[str] = []

    def switch(self, to: str) -> str:
        self.switches.append(to)
        self.current = to
        return to


@pytest.mark.parametrize("async_snapshot", [False, True], ids=["sync-snapshot", "async-snapshot"])
async def test_snapshot_mode_drops_calls_whose_snapshot_changed(async_snapshot: bool) -> None:
    sub = Subscription()
    locks = KeyedLock()
    reads = 0

    def read(agent: int, to: str) -> str:
        nonlocal reads
        reads += 1
        return sub.current

    async def aread(agent: int, to: str) -> str:
        await asyncio.sleep(0)
        return read(agent, to)

    @stale_guard(
        locks, key=lambda agent, to: f"agent:{agent}", snapshot=aread if async_snapshot else read
    )
    async def on_failure(agent: int, to: str) -> str:
        if not sub.switches:  # the burst: wait until every call snapshotted and queued
            await _until(lambda: locks.statistics("agent:1").waiting == 2)
        return sub.switch(to)

    results = await asyncio.gather(on_failure(1, "B"), on_failure(1, "C"), on_failure(1, "D"))
    assert results == ["B", SUPERSEDED, SUPERSEDED]
    assert sub.switches == ["B"]
    assert reads == 6  # each call: once at entry, once under the lock
    # a failure seen after the switch has a fresh snapshot: it runs
    assert await on_failure(1, "C") == "C"
    assert sub.switches == ["B", "C"]
    assert len(locks.backend) == 0  # type: ignore[arg-type]


async def test_snapshot_mode_raise() -> None:
    sub = Subscription()
    locks = KeyedLock()

    @stale_guard(locks, key=lambda to: "agent:9", snapshot=lambda to: sub.current, on_stale="raise")
    async def on_failure(to: str) -> str:
        await _until(lambda: locks.statistics("agent:9").waiting == 1)
        return sub.switch(to)

    results = await asyncio.gather(on_failure("B"), on_failure("C"), return_exceptions=True)
    assert results[0] == "B"
    error = results[1]
    assert isinstance(error, Superseded)
    assert error.key == "agent:9"
    assert "agent:9" in str(error)
    assert "'A'" not in str(error)  # values are not shown: they may hold secrets (row 26)
    assert "'B'" not in str(error)


def test_snapshot_mode_on_sync_functions_in_threads() -> None:
    sub = Subscription()
    locks = KeyedLock()
    results: list[object] = []

    @stale_guard(locks, key=lambda to: "agent:3", snapshot=lambda to: sub.current)
    def on_failure(to: str) -> str:
        deadline = time.monotonic() + 10
        while locks.statistics("agent:3").waiting < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        return sub.switch(to)

    threads = [
        threading.Thread(target=lambda to=to: results.append(on_failure(to))) for to in "BCDE"
    ]
    threads[0].start()
    while not locks.statistics("agent:3").held:
        time.sleep(0.001)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sub.switches == ["B"]
    assert sorted(results, key=repr) == sorted(["B", SUPERSEDED, SUPERSEDED, SUPERSEDED], key=repr)


# ------------------------------------------------------------------------ no-snapshot mode


async def test_a_call_that_arrived_before_a_completion_is_dropped() -> None:
    locks = KeyedLock()
    ran: list[int] = []
    release_first = asyncio.Event()

    @stale_guard(locks, key=lambda n: "agent:1")
    async def handle(n: int) -> int:
        ran.append(n)
        if n == 1:
            await release_first.wait()
        return n

    first = asyncio.create_task(handle(1))
    await _until(lambda: ran == [1])
    second = asyncio.create_task(handle(2))  # arrives while the first is running
    await _until(lambda: locks.statistics("agent:1").waiting == 1)
    release_first.set()
    assert await first == 1
    assert await second is SUPERSEDED
    assert await handle(3) == 3  # arrived after the completion: it runs
    assert ran == [1, 3]
    assert _completions(handle) == {}


async def test_a_handler_that_raised_does_not_count_as_completion() -> None:
    locks = KeyedLock()
    ran: list[int] = []
    release_first = asyncio.Event()

    @stale_guard(locks, key=lambda n: "agent:1")
    async def handle(n: int) -> int:
        ran.append(n)
        if n == 1:
            await release_first.wait()
            raise ConnectionError("restart failed")
        return n

    first = asyncio.create_task(handle(1))
    await _until(lambda: ran == [1])
    second = asyncio.create_task(handle(2))
    await _until(lambda: locks.statistics("agent:1").waiting == 1)
    release_first.set()
    with pytest.raises(ConnectionError):
        await first
    assert await second == 2  # the failure was not handled yet: the second call handles it
    assert _completions(handle) == {}
    assert len(locks.backend) == 0  # type: ignore[arg-type]


async def test_bookkeeping_is_per_key_and_freed() -> None:
    locks = KeyedLock()
    gate = asyncio.Event()

    @stale_guard(locks, key=lambda agent: f"agent:{agent}")
    async def handle(agent: int) -> int:
        await gate.wait()
        return agent

    calls = [asyncio.create_task(handle(a)) for a in (1, 2, 1, 2)]
    await _until(lambda: locks.statistics("agent:2").waiting == 1)
    assert set(_completions(handle)) == {"agent:1", "agent:2"}
    gate.set()
    assert await asyncio.gather(*calls) == [1, 2, SUPERSEDED, SUPERSEDED]  # one per key
    assert _completions(handle) == {}


async def test_bookkeeping_is_freed_after_a_timeout_and_a_bad_key() -> None:
    locks = KeyedLock()

    @stale_guard(locks, key=lambda k: k, timeout=0)
    async def handle(k: object) -> None:
        return None

    async with locks("busy"):
        with pytest.raises(keylock.LockTimeout):
            await handle("busy")
    with pytest.raises(keylock.InvalidKey):
        await handle("")
    assert _completions(handle) == {}
    assert len(locks.backend) == 0  # type: ignore[arg-type]


class _SlowRelease(MemoryBackend):
    """Pauses its releasing thread after the hand-off, so the next holder runs first."""

    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        super().release_sync(key, owner, token)
        time.sleep(0.02)


def test_sync_completion_is_seen_by_the_next_holder_in_another_thread() -> None:
    """The completion is recorded before the lock is handed on: the woken thread, which may
    run before the releasing thread takes another step, must already see it (a regression:
    it was recorded after the release, and the burst was handled twice)."""
    locks = KeyedLock(_SlowRelease())
    ran: list[int] = []
    first_inside = threading.Event()

    @stale_guard(locks, key=lambda n: "agent:1")
    def handle(n: int) -> int:
        ran.append(n)
        if n == 1:
            first_inside.set()
            deadline = time.monotonic() + 10
            while locks.statistics("agent:1").waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.001)
        return n

    results: list[object] = []
    first = threading.Thread(target=lambda: results.append(handle(1)))
    first.start()
    assert first_inside.wait(10)
    second = threading.Thread(target=lambda: results.append(handle(2)))
    second.start()
    first.join(30)
    second.join(30)
    assert ran == [1]
    assert sorted(results, key=repr) == [1, SUPERSEDED]
    assert _completions(handle) == {}


def test_no_snapshot_mode_on_sync_functions() -> None:
    locks = KeyedLock()

    @stale_guard(locks, key=lambda: "k", on_stale="raise")
    def handle() -> str:
        return "ran"

    assert handle() == "ran"
    assert handle() == "ran"  # sequential calls each arrive after the previous completion
    assert handle.__name__ == "handle"


# ------------------------------------------------------------------------------- logging


async def test_drops_are_logged_on_the_keylock_logger(caplog: pytest.LogCaptureFixture) -> None:
    locks = KeyedLock()
    value = "A"

    @stale_guard(locks, key=lambda: "agent:5", snapshot=lambda: value)
    async def handle() -> None:
        nonlocal value
        await _until(lambda: locks.statistics("agent:5").waiting == 1)
        value = "B"

    with caplog.at_level(logging.INFO, logger="keylock"):
        assert await asyncio.gather(handle(), handle()) == [None, SUPERSEDED]
    drops = [r for r in caplog.records if r.name == "keylock" and "dropped" in r.getMessage()]
    assert len(drops) == 1
    assert "agent:5" in drops[0].getMessage()
    assert "'A'" not in drops[0].getMessage()  # the fact, not the values (row 26)


# -------------------------------------------------------------- comparing, secrets (row 26)


class _Secret:
    """A record re-read each time, holding a secret; compares by identity only."""

    def __repr__(self) -> str:
        return "Subscription(api_key='sk_live_SECRET123')"


class _Uncomparable:
    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no comparisons")

    __hash__ = object.__hash__


def test_snapshots_equal_but_not_equal_to_themselves_do_not_drop_calls() -> None:
    """Row 26 (adv_40): on the old code (``!=``) a NaN snapshot, or one whose ``__eq__``
    raises, dropped (or crashed) every call: 0 of 5 ran."""
    locks = KeyedLock()
    ran: list[object] = []
    same = _Uncomparable()
    nans = iter([float("nan"), float("nan")] * 5)  # distinct NaN objects each read
    for snapshot in (lambda a: math.nan, lambda a: next(nans), lambda a: same):

        @stale_guard(locks, key=lambda a: f"agent:{a}", snapshot=snapshot)
        def handle(a: int) -> int:
            ran.append(a)
            return a

        assert [handle(n) for n in range(5)] == list(range(5))
    assert len(ran) == 15


def test_snapshots_that_cannot_be_compared_raise_a_clear_type_error() -> None:
    locks = KeyedLock()

    @stale_guard(locks, key=lambda a: "agent:1", snapshot=lambda a: _Uncomparable())
    def handle(a: int) -> int:
        return a

    with pytest.raises(TypeError, match=r"agent:1.*_Uncomparable.*comparable"):
        handle(1)
    assert len(locks.backend) == 0  # type: ignore[arg-type]


async def test_no_snapshot_value_is_logged_or_put_in_superseded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Row 26 (adv_40): the old code logged both snapshots' repr at INFO and put them in
    Superseded's message: the secret was in both."""
    locks = KeyedLock()

    @stale_guard(locks, key=lambda a: f"sub:{a}", snapshot=lambda a: _Secret(), on_stale="raise")
    async def switch(a: int) -> None:
        return None

    with caplog.at_level(logging.DEBUG, logger="keylock"), pytest.raises(Superseded) as info:
        await switch(1)
    assert "sk_live_SECRET123" not in str(info.value)
    assert "sub:1" in str(info.value)
    assert "sk_live_SECRET123" not in caplog.text
    assert "sub:1" in caplog.text


# ---------------------------------------------------------- expected= (issue 11 point 6)


async def test_expected_drops_a_late_event_the_entry_snapshot_lets_through() -> None:
    """Issue 11 point 6, the README reproducer: a second failure of A arriving after the
    switch to B. With the entry snapshot alone it snapshots B at entry and B under the lock,
    and switches B -> C (prints ``B C``); with ``expected=`` it is dropped (``B SUPERSEDED``).
    ``expected=`` does not exist on the old code (TypeError)."""
    sub = {"42": "A"}
    locks = KeyedLock()

    async def cur(a: str) -> str:
        await asyncio.sleep(0)
        return sub[a]

    async def on_fail(a: str, f: str) -> str:
        sub[a] = {"A": "B", "B": "C"}[sub[a]]
        return sub[a]

    entry_only = stale_guard(locks, key=lambda a, f: f"agent:{a}", snapshot=lambda a, f: cur(a))
    assert [await entry_only(on_fail)("42", "A"), await entry_only(on_fail)("42", "A")] == [
        "B",
        "C",
    ]  # the old form's blind spot, kept as it is: it compares two reads, not the event
    sub["42"] = "A"
    guarded = stale_guard(
        locks, key=lambda a, f: f"agent:{a}", expected=lambda a, f: f, snapshot=lambda a, f: cur(a)
    )(on_fail)
    first, second = await guarded("42", "A"), await guarded("42", "A")
    assert (first, second) == ("B", SUPERSEDED)
    assert await guarded("42", "B") == "C"  # B failing now is a real failure: handled
    # a burst of five, together: one switch
    sub["42"] = "A"
    assert (await asyncio.gather(*(guarded("42", "A") for _ in range(5)))).count("B") == 1
    assert sub["42"] == "B"


def test_expected_on_sync_handlers_with_an_async_expected_is_refused() -> None:
    locks = KeyedLock()
    state = {"k": "A"}

    @stale_guard(locks, key=lambda f: "k", expected=lambda f: f, snapshot=lambda f: state["k"])
    def switch(f: str) -> str:
        state["k"] = "B"
        return "B"

    assert [switch("A"), switch("A")] == ["B", SUPERSEDED]

    async def aread(f: str) -> str:
        return state["k"]

    with pytest.raises(TypeError, match="async"):
        stale_guard(locks, key=lambda f: "k", snapshot=aread)(lambda f: f)
    with pytest.raises(TypeError, match="snapshot"):
        stale_guard(locks, key=lambda f: "k", expected=lambda f: f)
    with pytest.raises(TypeError, match="expected"):
        stale_guard(locks, key=lambda f: "k", expected="A", snapshot=aread)  # type: ignore[arg-type]
