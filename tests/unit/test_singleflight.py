"""SingleFlight: concurrent callers of one key share one execution; cancellation and errors.

Every wait below is on an event or a gate the test opens itself, never on a sleep that has to
be "long enough".
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import keylock
from keylock import InvalidKey, SingleFlight


async def _spin(rounds: int = 5) -> None:
    """Let every ready task run a few steps."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Work:
    """A coroutine function that counts its runs and waits for ``gate`` before returning."""

    def __init__(self, result: object = "done") -> None:
        self.gate = asyncio.Event()
        self.started = 0
        self.cancelled = 0
        self.result = result

    async def __call__(self) -> object:
        self.started += 1
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.result


async def test_concurrent_callers_share_one_execution() -> None:
    flight = SingleFlight()
    runs = 0

    async def fetch(user: int, *, field: str) -> dict[str, object]:
        nonlocal runs
        runs += 1
        await _spin()
        return {"id": user, field: True}

    results = await asyncio.gather(*(flight.do("user:1", fetch, 1, field="x") for _ in range(50)))
    assert runs == 1
    assert results == [{"id": 1, "x": True}] * 50
    assert len(flight) == 0


async def test_distinct_keys_run_separately() -> None:
    flight = SingleFlight()
    runs: list[str] = []

    async def fetch(key: str) -> str:
        runs.append(key)
        await _spin()
        return key

    results = await asyncio.gather(*(flight.do(k, fetch, k) for k in ["a", "b", "a", "b"]))
    assert results == ["a", "b", "a", "b"]
    assert sorted(runs) == ["a", "b"]


async def test_leader_cancelled_while_a_hundred_followers_wait() -> None:
    flight = SingleFlight()
    work = Work()
    leader = asyncio.create_task(flight.do("k", work))
    await _spin()
    followers = [asyncio.create_task(flight.do("k", work)) for _ in range(100)]
    await _spin()
    assert work.started == 1
    leader.cancel()
    await _spin()
    assert leader.cancelled()
    assert len(flight) == 1  # the work goes on for the followers
    work.gate.set()
    assert await asyncio.gather(*followers) == ["done"] * 100
    assert (work.started, work.cancelled) == (1, 0)
    assert len(flight) == 0


async def test_everyone_cancelled_cancels_the_work_then_a_newcomer_runs_fresh() -> None:
    flight = SingleFlight()
    work = Work()
    callers = [asyncio.create_task(flight.do("k", work)) for _ in range(10)]
    await _spin()
    assert work.started == 1
    for caller in callers[:-1]:
        caller.cancel()
    await _spin()
    assert work.cancelled == 0  # one caller is left: the work goes on
    callers[-1].cancel()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    await _spin()
    assert work.cancelled == 1  # the work itself saw the cancellation
    assert len(flight) == 0

    newcomer = asyncio.create_task(flight.do("k", work))
    await _spin()
    assert work.started == 2  # a fresh run, not the cancelled one
    work.gate.set()
    assert await newcomer == "done"
    assert len(flight) == 0


async def test_a_caller_cancelled_while_others_share_the_wait_leaves_them_the_result() -> None:
    """Callers await one shared future until one of them is cancelled (that cancel cancels
    the shared future and wakes them all); the others then see they were not the one
    cancelled and wait on futures of their own. A caller that had swallowed an earlier
    cancellation (its Task.cancelling() is already 1) is not taken for the cancelled one
    (fails when a caller judges by cancelling() > 0 instead of against its own count)."""
    flight = SingleFlight()
    work = Work()

    async def swallowed_a_cancel_before() -> object:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # (no uncancel(): its cancelling() count stays at 1)
        return await flight.do("k", work)

    stale = asyncio.create_task(swallowed_a_cancel_before())
    await _spin()
    stale.cancel()
    callers = [asyncio.create_task(flight.do("k", work)) for _ in range(3)]
    await _spin()
    callers[0].cancel()
    await _spin()
    callers[1].cancel()  # a second one leaves from its own future
    await _spin()
    work.gate.set()
    assert await asyncio.gather(stale, callers[2]) == ["done", "done"]
    assert callers[0].cancelled()
    assert callers[1].cancelled()
    assert (work.started, work.cancelled) == (1, 0)


async def test_callers_woken_by_a_cancel_after_the_work_ended_get_its_result() -> None:
    """The work ends, then a caller is cancelled before the outcome was handed out: the
    others, woken by that cancel after the hand-out ran, take the result from the finished
    run (fails, hanging, when they wait on a future of their own nobody will set)."""
    flight = SingleFlight()
    work = Work()
    callers = [asyncio.create_task(flight.do("k", work)) for _ in range(3)]
    await _spin()
    work.gate.set()  # the run's last step is next; this test resumes right after it
    await asyncio.sleep(0)  # the run ends; handing out its outcome is scheduled after it
    assert flight._flights[("k", asyncio.get_running_loop())].task.done()
    callers[0].cancel()  # the shared future is cancelled before the hand-out runs
    results = await asyncio.wait_for(asyncio.gather(*callers[1:]), 5)
    assert results == ["done", "done"]
    assert callers[0].cancelled()


async def test_leader_error_reaches_fifty_followers_each_its_own_instance() -> None:
    flight = SingleFlight()
    runs = 0

    class BackendDown(Exception):
        pass

    async def work() -> None:
        nonlocal runs
        runs += 1
        await _spin()
        raise BackendDown("backend down for user:1")

    results = await asyncio.gather(
        *(flight.do("k", work) for _ in range(51)), return_exceptions=True
    )
    assert runs == 1
    assert all(type(r) is BackendDown for r in results)
    assert {str(r) for r in results} == {"backend down for user:1"}
    assert len({id(r) for r in results}) == 51  # distinct instances: no shared traceback
    assert len(flight) == 0


class CodedError(Exception):
    """``__init__`` takes other arguments than it stores in ``args``."""

    def __init__(self, code: int) -> None:
        super().__init__(f"error code {code}")
        self.code = code


class KeywordError(Exception):
    """``__init__`` needs a keyword ``args`` does not carry."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


@pytest.mark.parametrize(
    "error",
    [CodedError(503), KeywordError("throttled", status=429), keylock.LockTimeout("t", key="k")],
    ids=["args-rewriting-init", "keyword-only-init", "keylock-error"],
)
async def test_followers_get_faithful_copies_of_awkward_exceptions(error: Exception) -> None:
    flight = SingleFlight()

    async def work() -> None:
        await _spin()
        raise error

    results = await asyncio.gather(
        *(flight.do("k", work) for _ in range(5)), return_exceptions=True
    )
    assert all(type(r) is type(error) for r in results)
    assert {str(r) for r in results} == {str(error)}
    assert all(vars(r) == vars(error) for r in results)
    assert len({id(r) for r in results}) == 5
    results[0].add_note("seen by caller 0")
    assert not getattr(results[1], "__notes__", None)


async def test_nothing_is_cached_after_completion() -> None:
    flight = SingleFlight()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await flight.do("k", work) == 1
    assert await flight.do("k", work) == 2
    assert len(flight) == 0


async def test_forget_lets_newcomers_start_a_fresh_run() -> None:
    flight = SingleFlight()
    first_work, second_work = Work("first"), Work("second")
    first = asyncio.create_task(flight.do("k", first_work))
    await _spin()
    flight.forget("k")
    second = asyncio.create_task(flight.do("k", second_work))
    joined = asyncio.create_task(flight.do("k", first_work))  # joins the second run
    await _spin()
    assert (first_work.started, second_work.started) == (1, 1)
    first_work.gate.set()
    second_work.gate.set()
    assert await asyncio.gather(first, second, joined) == ["first", "second", "second"]
    assert len(flight) == 0


async def test_a_newcomer_waits_for_a_cancelled_run_to_clean_up_then_runs_fresh() -> None:
    """Row 41: one run per key at a time. The only caller is cancelled; its run, cancelled,
    still cleans up (an ``await`` in ``finally``). Newcomers wait for that run's end, then
    share one fresh run; ``forget`` meanwhile changes nothing. Before, the cancelled run left
    its slot at once and the first newcomer started a second run beside it: this test failed
    on ``started == 1`` (it was 2, two runs of one key at once)."""
    flight = SingleFlight()
    cleanup = asyncio.Event()
    started = running = peak = 0

    async def work() -> str:
        nonlocal started, running, peak
        started += 1
        run = started
        running += 1
        peak = max(peak, running)
        try:
            if run == 1:
                await asyncio.Event().wait()  # until cancelled
            return f"run {run}"
        finally:
            if run == 1:
                await cleanup.wait()
            running -= 1

    first = asyncio.create_task(flight.do("k", work))
    await _spin()
    first.cancel()
    await _spin()
    assert first.cancelled()
    flight.forget("k")
    newcomers = [asyncio.create_task(flight.do("k", work)) for _ in range(3)]
    await _spin()
    assert started == 1  # the cancelled run still cleans up: nobody starts another
    assert len(flight) == 1
    cleanup.set()
    assert await asyncio.gather(*newcomers) == ["run 2"] * 3
    assert (started, peak) == (2, 1)
    assert len(flight) == 0


async def test_a_newcomer_waiting_for_a_cancelled_run_can_itself_be_cancelled() -> None:
    """A caller waiting for a cancelled run's cleanup leaves cleanly when cancelled; the
    next caller after the cleanup runs fresh."""
    flight = SingleFlight()
    cleanup = asyncio.Event()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        try:
            if runs == 1:
                await asyncio.Event().wait()
            return runs
        finally:
            if runs == 1:
                await cleanup.wait()

    first = asyncio.create_task(flight.do("k", work))
    await _spin()
    first.cancel()
    await _spin()
    waiting = asyncio.create_task(flight.do("k", work))
    await _spin()
    waiting.cancel()
    await _spin()
    assert waiting.cancelled()
    cleanup.set()
    await _spin()
    assert len(flight) == 0
    assert await flight.do("k", work) == 2


def test_forget_is_safe_while_loops_in_other_threads_run_flights() -> None:
    """Row 40: ``forget`` from one thread while two event loops start and finish flights in
    theirs. Thread switches are forced every microsecond so a switch lands inside forget's
    scan. Before, forget iterated the flights unguarded and raised ``RuntimeError:
    dictionary changed size during iteration`` within a few hundredths of a second: this test
    failed on that error."""
    flight = SingleFlight()
    stop = threading.Event()

    async def work(i: int) -> int:
        await asyncio.sleep(0)
        return i

    async def churn(tag: str) -> None:
        i = 0
        while not stop.is_set():
            keys = [f"{tag}:{i + j}" for j in range(200)]
            assert await asyncio.gather(*(flight.do(k, work, n) for n, k in enumerate(keys))) == [
                *range(200)
            ]
            i += 200

    loops = [threading.Thread(target=asyncio.run, args=(churn(tag),)) for tag in "ab"]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in loops:
            thread.start()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            flight.forget("a:1")
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        for thread in loops:
            thread.join(30)
    assert not any(thread.is_alive() for thread in loops)
    assert len(flight) == 0


def test_a_backend_that_cannot_coalesce_across_hosts_is_refused_without_loading_redis_code(
    tmp_path: Path,
) -> None:
    """SingleFlight recognises a RedisBackend by type; any other backend is a TypeError that
    names the choices, and deciding that loads neither the Redis backend nor the cross-host
    flight (portalocker itself imports redis-py, so that is not what is checked)."""
    code = (
        "import sys, keylock\n"
        "from keylock.backends.file import FileBackend\n"
        "try:\n"
        f"    keylock.SingleFlight(FileBackend({str(tmp_path)!r}))\n"
        "except TypeError as exc:\n"
        "    assert 'RedisBackend' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('accepted')\n"
        "loaded = {'keylock.backends.redis', 'keylock._remote_flight'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _in_threads(count: int, target: object) -> None:
    barrier = threading.Barrier(count)

    def run() -> None:
        barrier.wait()
        target()  # type: ignore[operator]

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)


class _Joined(keylock.Observer):
    """Sets ``event`` once *count* callers have joined a run in flight."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.event = threading.Event()
        self._mutex = threading.Lock()

    def coalesced(self, prefix: str) -> None:
        with self._mutex:
            self.count -= 1
            if self.count == 0:
                self.event.set()


def test_do_sync_shares_one_execution_across_threads() -> None:
    joined = _Joined(7)
    flight = SingleFlight(observer=joined)
    runs = 0
    results: list[object] = []

    def work(value: str) -> str:
        nonlocal runs
        runs += 1
        assert joined.event.wait(10)  # every other thread joined this run
        return value

    _in_threads(8, lambda: results.append(flight.do_sync("k", work, "v")))
    assert runs == 1
    assert results == ["v"] * 8
    assert len(flight) == 0


def test_do_sync_errors_reach_every_thread() -> None:
    joined = _Joined(5)
    flight = SingleFlight(observer=joined)
    runs = 0
    errors: list[BaseException] = []

    def work() -> None:
        nonlocal runs
        runs += 1
        assert joined.event.wait(10)
        raise CodedError(7)

    def call() -> None:
        try:
            flight.do_sync("k", work)
        except CodedError as exc:
            errors.append(exc)

    _in_threads(6, call)
    assert runs == 1
    assert len(errors) == 6
    assert {str(e) for e in errors} == {"error code 7"}
    assert len({id(e) for e in errors}) == 6
    assert len(flight) == 0
    assert flight.do_sync("k", lambda: "again") == "again"  # nothing cached, errors neither


@pytest.mark.parametrize("key", ["", "x" * (keylock.MAX_KEY_LENGTH + 1), "a\x00b", 7, None, ["k"]])
async def test_invalid_key(key: object) -> None:
    flight = SingleFlight()
    work = Work()
    with pytest.raises(InvalidKey):
        await flight.do(key, work)  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        flight.do_sync(key, lambda: None)  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        flight.forget(key)  # type: ignore[arg-type]
    assert work.started == 0
    assert len(flight) == 0


async def test_a_str_subclass_key_is_checked_even_while_a_flight_runs() -> None:
    """A caller whose key finds a running flight skips the key check (that flight's key was
    checked); a str subclass, which could compare equal to anything, still goes through it,
    as a plain copy that joins only the flight of an equal plain key."""

    class Loose(str):
        def __hash__(self) -> int:
            return hash("a")

        def __eq__(self, other: object) -> bool:
            return True

    flight = SingleFlight()
    work = Work()
    first = asyncio.create_task(flight.do("a", work))
    await _spin()
    other = Work("other")
    joined = asyncio.create_task(flight.do(Loose("b"), other))
    await _spin()
    work.gate.set()
    other.gate.set()
    assert await asyncio.gather(first, joined) == ["done", "other"]
    assert (work.started, other.started) == (1, 1)


def test_a_serializer_without_a_backend_is_refused() -> None:
    """Row 38 (adv_31): SingleFlight(serializer=json) with no backend was silently accepted,
    though nothing is ever serialized in one process."""
    import json

    with pytest.raises(ValueError, match="serializer"):
        SingleFlight(serializer=json)  # type: ignore[arg-type]
