"""FileBackend callers waiting for another process: they sleep in flock and the kernel wakes
them at the holder's unlock (no polling), and one that gives up leaves nothing behind: no lock,
no waiting mark, no file, no thread, even when the lock comes to it as it leaves."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keylock import BackendUnavailable, KeyedLock, LockTimeout
from keylock.backends import FileBackend, _filewait
from keylock.backends._fileshared import Waiting
from keylock.backends._waiters import ThreadWaiter
from keylock.backends.base import Deadline, Grant
from keylock.backends.file import file_name

from .._poll import until

_HOLD = textwrap.dedent(
    """
    import sys
    from keylock import KeyedLock
    from keylock.backends import FileBackend
    locks = KeyedLock(FileBackend(sys.argv[1]))
    with locks.sync(sys.argv[2]):
        print("held", flush=True)
        sys.stdin.readline()
    """
)

_TRY = textwrap.dedent(
    """
    import sys
    from keylock import KeyedLock, LockTimeout
    from keylock.backends import FileBackend
    try:
        KeyedLock(FileBackend(sys.argv[1])).acquire_sync(sys.argv[2], timeout=0).release_sync()
        print("acquired")
    except LockTimeout:
        print("busy")
    """
)

_MARKED = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)
    except OSError:
        print("marked")
    else:
        print("free")
    """
)


@contextlib.contextmanager
def _held_elsewhere(directory: Path, key: str) -> Iterator[Callable[[], None]]:
    """Another process holds *key* until the release function it yields is called."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(directory), key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    stdin = holder.stdin

    def release() -> None:
        if not stdin.closed:
            stdin.write("\n")
            stdin.close()
        holder.wait(30)

    try:
        assert holder.stdout.readline().strip() == "held"
        yield release
    finally:
        holder.kill()
        holder.wait()
        if not stdin.closed:
            stdin.close()
        holder.stdout.close()


def _elsewhere_gets(directory: Path, key: str) -> bool:
    """Whether another process can take *key* at once."""
    out = subprocess.run(
        [sys.executable, "-c", _TRY, str(directory), key], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "acquired"


def _marked(directory: Path, key: str) -> bool:
    """Whether some process holds a waiting mark on *key*'s file (asked from another one)."""
    path = directory / file_name(key)
    out = subprocess.run(
        [sys.executable, "-c", _MARKED, str(path)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "marked"


def _flock_threads() -> int:
    return sum(t.name == "keylock-flock" and t.is_alive() for t in threading.enumerate())


def _count_trips(backend: FileBackend) -> list[int]:
    """Count the waiting trips *backend* makes (its poll loop, if it had one, shows here)."""
    trips = [0]
    make = backend._make_trip

    def counted(flow: object, trip: object, *, inline: bool) -> object:
        trips[0] += 1
        return make(flow, trip, inline=inline)  # type: ignore[arg-type]

    backend._make_trip = counted  # type: ignore[method-assign]
    return trips


@pytest.mark.parametrize(
    ("timeout", "flavour"),
    [(30.0, "sync"), (None, "sync"), (None, "async")],
    ids=["pool-thread", "caller-thread", "event-loop"],
)
def test_a_waiter_sleeps_in_flock_until_the_holder_unlocks(
    tmp_path: Path, timeout: float | None, flavour: str
) -> None:
    """Issue 15: a waiting process polled the OS lock every 0.5-2 ms (hundreds of trips per
    second of waiting). Now one trip starts a flock the kernel ends at the holder's unlock:
    the waiter stays marked and makes at most a couple of trips, however long it waits. Fails
    before the change: the probes below take long enough for dozens of polls."""
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    trips = _count_trips(backend)
    got = threading.Event()

    def wait() -> None:
        if flavour == "async":

            async def take() -> None:
                async with locks("hot", timeout=timeout):
                    got.set()

            asyncio.run(take())
            return
        with locks.sync("hot", timeout=timeout):
            got.set()

    with _held_elsewhere(tmp_path, "hot") as release:
        waiter = threading.Thread(target=wait)
        waiter.start()
        until(lambda: _marked(tmp_path, "hot"), "the waiter never marked itself")
        for _ in range(3):  # each probe is a new interpreter: tens of milliseconds
            assert _marked(tmp_path, "hot")
        assert trips[0] <= 2, f"{trips[0]} trips while the holder held the key: polling"
        assert not got.is_set()
        release()
        waiter.join(30)
    assert got.is_set()
    assert trips[0] <= 3
    assert backend._shared.waiting == {}
    assert backend._shared.fds == set()


@pytest.mark.parametrize("flavour", ["timeout", "cancel"])
def test_a_waiter_that_gives_up_leaves_nothing_behind(
    tmp_path: Path, flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that times out (sync) or is cancelled (async) while a thread of its process
    blocks in flock for it: its waiting mark goes at once; the thread keeps the flock until
    the holder unlocks, then lets the lock go, closes the file and ends; nothing stays locked."""
    monkeypatch.setattr(_filewait, "_IDLE", 0.05)  # idle pool threads end quickly
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    with _held_elsewhere(tmp_path, "hot") as release:
        if flavour == "timeout":
            with pytest.raises(LockTimeout):
                locks.acquire_sync("hot", timeout=0.2)
        else:

            async def give_up() -> None:
                task = asyncio.ensure_future(locks.acquire("hot", timeout=30))
                await asyncio.sleep(0)
                while not backend._shared.waiting.get("hot", Waiting(-1)).blocked:
                    await asyncio.sleep(0.005)  # bounded by the test's timeout
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            asyncio.run(give_up())
        assert not _marked(tmp_path, "hot")  # nobody steps aside for a caller who left
        wait = backend._shared.waiting["hot"]  # the thread still waits in flock ...
        assert wait.blocked
        assert wait.waiter is None
        assert not wait.done
        assert locks.statistics("hot").waiting == 0
        release()
    until(lambda: backend._shared.waiting == {}, "the thread kept its wait")
    assert backend._shared.fds == set()
    assert _elsewhere_gets(tmp_path, "hot")  # ... and let the lock go when it came
    until(lambda: _flock_threads() == 0, "a pool thread stayed")


def test_a_grant_that_comes_as_the_caller_gives_up_is_passed_on(tmp_path: Path) -> None:
    """The flock returns for a caller, who gives up before it comes back for the lock: its
    leaving releases the lock (the engine's contract: a grant racing a cancel is passed on)."""
    backend = FileBackend(tmp_path)
    with _held_elsewhere(tmp_path, "hot") as release:
        flow = backend._flow(
            "hot",
            b"owner",
            None,
            Deadline("hot", 30, time.monotonic()),
            ThreadWaiter(b"owner", None),
            Grant(1, None, None),
        )
        assert backend._trip_sync(flow, _filewait.TRY) is _filewait.BLOCKED
        wait = backend._shared.waiting["hot"]
        release()
        until(lambda: wait.done, "the flock never returned")
    assert not _elsewhere_gets(tmp_path, "hot")  # held by our thread's file, for the caller
    backend._trip_sync(flow, flow.leaving())
    assert backend._shared.waiting == {}
    assert backend._shared.fds == set()
    assert _elsewhere_gets(tmp_path, "hot")


def test_the_next_caller_takes_over_the_flock_of_one_that_gave_up(tmp_path: Path) -> None:
    """One thread per key and process waits in the kernel: a caller that comes after another
    gave up is woken by the flock that caller left, not by a second one."""
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    got = threading.Event()

    def wait() -> None:
        with locks.sync("hot", timeout=30):
            got.set()

    with _held_elsewhere(tmp_path, "hot") as release:
        with pytest.raises(LockTimeout):
            locks.acquire_sync("hot", timeout=0.1)
        left = backend._shared.waiting["hot"]
        waiter = threading.Thread(target=wait)
        waiter.start()
        until(lambda: left.waiter is not None, "the next caller never took the wait over")
        assert backend._shared.waiting["hot"] is left
        assert len(backend._shared.fds) == 1  # one file, one flock
        assert _marked(tmp_path, "hot")
        release()
        waiter.join(30)
    assert got.is_set()
    assert backend._shared.fds == set()


def test_a_fork_while_a_thread_waits_in_flock(tmp_path: Path) -> None:
    """The child of a fork taken while a thread of the parent blocks in flock closes that
    file and starts with no waits and a pool of its own; the parent's wait goes on."""
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    got = threading.Event()

    def wait() -> None:
        with locks.sync("hot", timeout=30):
            got.set()

    with _held_elsewhere(tmp_path, "hot") as release:
        waiter = threading.Thread(target=wait)
        waiter.start()
        until(lambda: backend._shared.waiting.get("hot", Waiting(-1)).blocked, "no flock")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no lock file open, and its own keys still work
            os.close(read)
            answer = b"ok"
            try:
                for fd in range(3, 1024):
                    with contextlib.suppress(OSError):
                        if fd != write and os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
                            answer = b"lock file open"
                if backend._shared.waiting:
                    answer = b"waits inherited"
                with locks.sync("other", timeout=5):
                    pass
            except BaseException as exc:
                answer = repr(exc).encode()
            os.write(write, answer)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            answer = pipe.read()
        os.waitpid(pid, 0)
        assert answer == b"ok"
        assert not got.is_set()
        release()
        waiter.join(30)
    assert got.is_set()


def test_callers_poll_when_no_thread_can_wait_for_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the pool full (or the OS refusing threads), a timed caller polls, as before."""
    monkeypatch.setattr(_filewait, "_IDLE", 0.05)
    until(lambda: _flock_threads() == 0, "earlier pool threads stayed")
    monkeypatch.setattr(_filewait, "_MAX_THREADS", 0)
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    trips = _count_trips(backend)
    got = threading.Event()

    def wait() -> None:
        with locks.sync("hot", timeout=30):
            got.set()

    with _held_elsewhere(tmp_path, "hot") as release:
        waiter = threading.Thread(target=wait)
        waiter.start()
        until(lambda: trips[0] > 5, "the caller did not poll")
        assert not backend._shared.waiting["hot"].blocked
        release()
        waiter.join(30)
    assert got.is_set()
    assert backend._shared.fds == set()


def test_a_failed_flock_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int, aside: object, wanted: object) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(_filewait, "take_turn", failing)
    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    with _held_elsewhere(tmp_path, "hot"):
        with pytest.raises(BackendUnavailable, match=r"'hot'.*No locks available"):
            locks.acquire_sync("hot", timeout=30)
        assert backend._shared.waiting == {}
        assert backend._shared.fds == set()
        assert locks.statistics("hot").waiting == 0


def test_a_signal_interrupts_a_caller_waiting_in_flock_itself(tmp_path: Path) -> None:
    """A sync caller without a timeout waits in flock on its own thread; a signal handler that
    raises (Ctrl-C's KeyboardInterrupt, here an alarm) ends the wait, and nothing stays: no
    file, no mark, no queue entry, and the key goes to the next process."""

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    backend = FileBackend(tmp_path)
    locks = KeyedLock(backend)
    trips = _count_trips(backend)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with _held_elsewhere(tmp_path, "hot") as release:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Interrupted):
                locks.acquire_sync("hot")
            assert trips[0] <= 2  # (one blocking trip, then the leaving)
            assert backend._shared.waiting == {}
            assert backend._shared.fds == set()
            assert not _marked(tmp_path, "hot")
            assert locks.statistics("hot").waiting == 0
            release()
        assert _elsewhere_gets(tmp_path, "hot")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
