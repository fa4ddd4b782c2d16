"""RedisBackend when Redis is out (issue 16, findings 4 and 9): a server that never answers is
an outage, not contention; an outage is logged once, not twice a second; closing is prompt."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from keylock import BackendUnavailable, KeyedLock, KeylockError, LockTimeout
from keylock.backends import RedisBackend
from keylock.backends.base import RW_LIMIT
from keylock.backends.redis import _wire
from keylock.backends.redis._flow import MIN_TRIP, SILENT, AcquireFlow, ServerClock
from keylock.backends.redis._keys import Layout
from keylock.backends.redis._permits import PermitProtocol

from .._poll import polled
from .._redis_server import Server

SECRET = "hunter2-s3cret"
TIMEOUT = 2.0  # as in the issue
SLACK = 0.75  # beyond the timeout: the caller's LEAVE (0.25 s) and a loaded machine
PROMPT = 1.0  # close() after an outage: well under the socket timeout (5 s)


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """The port of a server that accepts connections and never answers (hung, paused by
    SIGSTOP, or not Redis at all)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.05)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])  # kept open, never read

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for conn in [*accepted, listener]:
            conn.close()


def _check_unavailable(exc: BaseException, port: int) -> None:
    assert isinstance(exc, BackendUnavailable)
    assert f"127.0.0.1:{port}" in str(exc)
    assert "job:7" in str(exc)
    assert SECRET not in str(exc)


def test_a_server_that_never_answers_is_unavailable_not_contention_sync() -> None:
    """``locks.sync(key, timeout=...)`` against a server that accepts and never replies raises
    BackendUnavailable naming host:port (no password) within about the timeout, and
    close_sync() then returns at once. Fails on the old code (LockTimeout, "another holder
    still has it", with nobody holding the key; close_sync took 3 s)."""
    with silent_server() as port:
        locks = KeyedLock(RedisBackend.from_url(f"redis://:{SECRET}@127.0.0.1:{port}/0"))
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as caught, locks.sync("job:7", timeout=TIMEOUT):
            pass
        assert time.monotonic() - started < TIMEOUT + SLACK
        _check_unavailable(caught.value, port)
        started = time.monotonic()
        locks.close_sync()
        assert time.monotonic() - started < PROMPT


async def test_a_server_that_never_answers_is_unavailable_not_contention_async() -> None:
    """The same for ``await locks.acquire(key, timeout=...)`` and ``await locks.close()``.
    Fails on the old code (LockTimeout; close() took 6.8 s, waiting out the LEAVE)."""
    with silent_server() as port:
        locks = KeyedLock(RedisBackend.from_url(f"redis://:{SECRET}@127.0.0.1:{port}/0"))
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as caught:
            await locks.acquire("job:7", timeout=TIMEOUT)
        assert time.monotonic() - started < TIMEOUT + SLACK
        _check_unavailable(caught.value, port)
        started = time.monotonic()
        await locks.close()
        assert time.monotonic() - started < PROMPT


async def test_a_real_holder_is_still_a_lock_timeout(redis_server: Server) -> None:
    """Contention stays LockTimeout (Redis answered: the key is taken), both flavours."""
    redis_server.flush()
    holder = KeyedLock(RedisBackend.from_url(redis_server.url))
    waiter = KeyedLock(RedisBackend.from_url(redis_server.url))
    held = await holder.acquire("job:7")
    with pytest.raises(LockTimeout):
        await waiter.acquire("job:7", timeout=0.3)
    with pytest.raises(LockTimeout):
        await asyncio.to_thread(waiter.acquire_sync, "job:7", timeout=0.3)
    await held.release()
    await holder.close()
    await waiter.close()


def _protocol(timeout: float = 2.0, shape: tuple[int, int] | None = None) -> AcquireFlow:
    """The protocol state of one acquire of 'job:7' (of a permit of *shape* when given)."""
    options: dict[str, Any] = {
        "ttl": 30.0,
        "timeout": timeout,
        "now": 100.0,
        "channel": "wake",
        "stay_ms": 4000,
        "poll": 1.0,
        "renewed": True,
    }
    if shape is None:
        return AcquireFlow(Layout("keylock"), "job:7", b"o" * 16, **options)
    limit, weight = shape
    return PermitProtocol(
        Layout("keylock"), "job:7", b"o" * 16, limit=limit, weight=weight, confirm=False, **options
    )


def test_which_trips_were_answered_decides_the_error() -> None:
    """At the deadline, a trip with no reply is LockTimeout if Redis answered an earlier
    trip of the acquire (it queued us: the key is held), BackendUnavailable if it answered
    none for SILENT seconds, and sooner a LockTimeout saying Redis had not answered yet (a
    cold connection on a busy host is that slow); before the deadline the error is what the
    wire said. Fails on the old code (it was LockTimeout, "another holder still has it",
    either way)."""
    timed_out = BackendUnavailable("Redis at h:1 failed: Timeout", key="job:7")
    timed_out.__cause__ = TimeoutError()
    flow = _protocol()
    flow.next_trip(100.0)
    assert flow.failed(timed_out, 101.0, "h:1") is timed_out  # before the deadline
    never = flow.failed(timed_out, 102.0, "h:1")
    assert isinstance(never, BackendUnavailable)
    assert "did not answer" in str(never)
    assert "h:1" in str(never)
    flow.on_reply([0, 5000, 100_000_000], 100.0, 100.01, 100.01, ServerClock(), True)
    flow.next_trip(101.0)
    held = flow.failed(timed_out, 102.0, "h:1")
    assert isinstance(held, LockTimeout)
    assert "another holder" in str(held)
    short = _protocol(timeout=0.05)
    short.next_trip(100.0)
    too_soon = short.failed(timed_out, 100.05 + MIN_TRIP, "h:1")
    assert isinstance(too_soon, LockTimeout)
    assert "had not answered yet" in str(too_soon)
    assert SILENT > 100.05 + MIN_TRIP - 100.0
    refused = BackendUnavailable("Redis at h:1 failed: refused", key="job:7")
    refused.__cause__ = ConnectionRefusedError()
    assert _protocol().failed(refused, 102.0, "h:1") is refused  # not a timeout: as it is


@pytest.mark.parametrize(
    ("limit", "weight", "named"),
    [
        (3, 1, "semaphore 'job:7'"),
        (RW_LIMIT, 1, "RW lock 'job:7'"),
        (RW_LIMIT, RW_LIMIT, "RW lock"),
    ],
)
def test_a_permit_that_redis_never_answered_is_named_as_what_it_is(
    limit: int, weight: int, named: str
) -> None:
    """A semaphore or RW lock acquire that Redis did not answer says "semaphore"/"RW lock",
    not "lock", in both the too-soon LockTimeout and the BackendUnavailable. Fails on the
    old code (both said "lock 'job:7'")."""
    timed_out = BackendUnavailable("Redis at h:1 failed: Timeout", key="job:7")
    timed_out.__cause__ = TimeoutError()
    flow = _protocol(2.0, (limit, weight))
    flow.next_trip(100.0)
    never = flow.failed(timed_out, 102.0, "h:1")
    assert isinstance(never, BackendUnavailable)
    assert named in str(never)
    assert "lock 'job:7'" not in str(never).replace("RW lock 'job:7'", "")
    short = _protocol(0.05, (limit, weight))
    short.next_trip(100.0)
    too_soon = short.failed(timed_out, 100.05 + MIN_TRIP, "h:1")
    assert isinstance(too_soon, LockTimeout)
    assert str(too_soon).startswith(named)


def _listener_records(
    caplog: pytest.LogCaptureFixture, backend: RedisBackend
) -> list[logging.LogRecord]:
    """What *backend*'s own listener logged (a listener another test left retrying against
    its stopped server logs under the same thread name: a CI run counted one of its tries)."""
    listener = backend._waiting.listener
    thread = None if listener is None else listener._thread.ident
    return [
        record for record in caplog.records if record.thread == thread and record.name == "keylock"
    ]


def test_an_outage_is_logged_once_and_retried_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An idle backend whose server goes away logs one WARNING for the outage, retries
    with growing waits (not every 0.5 s), and logs one INFO once it is subscribed again.
    Fails on the old code (a WARNING per try, two a second)."""
    caplog.set_level(logging.DEBUG, logger="keylock")
    server = Server()
    server.start()
    locks = KeyedLock(RedisBackend.from_url(server.url))
    try:
        locks.acquire_sync("job:7", timeout=1).release_sync()  # a waiter: the listener starts
        backend = locks._backend
        assert isinstance(backend, RedisBackend)
        assert polled(backend._waiting.subscribed, 15)
        server.stop()
        assert polled(
            lambda: len(_listener_records(caplog, backend)) >= 4, 15
        )  # the first try + 3 more
        tries = _listener_records(caplog, backend)
        warnings = [record for record in tries if record.levelno == logging.WARNING]
        assert len(warnings) == 1, [record.getMessage() for record in warnings]
        assert f"127.0.0.1:{server.port}" in warnings[0].getMessage()
        gaps = [later.created - earlier.created for earlier, later in itertools.pairwise(tries)]
        assert gaps[2] > 1.5 * gaps[0], gaps  # backing off: 0.25 s, 0.5 s, 1 s, ...
        server.start()
        assert polled(backend._waiting.subscribed, 15)
        assert polled(
            lambda: any(r.levelno == logging.INFO for r in _listener_records(caplog, backend)), 15
        )
        levels = [record.levelno for record in _listener_records(caplog, backend)]
        assert levels.count(logging.WARNING) == 1
        assert levels.count(logging.INFO) == 1
    finally:
        locks.close_sync()
        server.stop()


async def test_a_waiter_that_gave_up_is_not_reported_as_a_cancelled_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A caller that timed out (nobody cancelled anything) leaves the Redis line in the
    background; when that LEAVE fails, no "finishing a cancelled call failed" WARNING.
    Fails on the old code (the LEAVE's failure was logged as a cancelled call's)."""
    caplog.set_level(logging.DEBUG, logger="keylock")
    with silent_server() as port:
        backend = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
        locks = KeyedLock(backend)
        with pytest.raises(KeylockError):  # (which error: the tests above)
            await locks.acquire("job:7", timeout=0.2)
        loop = asyncio.get_running_loop()
        for _ in range(300):  # bounded: the LEAVE fails at the socket timeout
            if not [task for task in _wire.background if task.get_loop() is loop]:
                break
            await asyncio.sleep(0.01)
        assert not [task for task in _wire.background if task.get_loop() is loop]
        await locks.close()
    cancelled = [r for r in caplog.records if "finishing a cancelled call" in r.getMessage()]
    assert cancelled == []
    assert any("leaving the line for 'job:7' failed" in r.getMessage() for r in caplog.records)
