"""Where one Redis hot-key hand-off spends its time: two processes take turns on one key, and
each hand-off is split at the moment the wake-up reaches the waiting process.

keylock: the release script hands the key to the head of the queue and publishes to that
process's channel; its listener thread reads the message (the first split) and wakes the
waiting thread, whose acquire returns. python-redis-lock: the release script pushes to a
signal list; the waiter's BLPOP returns (the first split), then it retries ``SET NX``. Every
time is CLOCK_MONOTONIC, one timeline for the processes of a host.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from .. import KeyedLock
from ..backends.redis import RedisBackend, _listener
from .harness import Row, Suite

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.synchronize import Event

    from ..backends.redis._listener import HandOff

__all__ = ["FAMILY", "SEGMENTS", "run"]

FAMILY = "redis hand-off, 2 processes"
#: The parts of a hand-off, in order, and the last one: all of it.
SEGMENTS = (
    "release call returns",
    "release -> wake-up read by the waiting process",
    "wake-up read -> acquire returns",
    "release -> acquire returns (the hand-off)",
)

_clock = time.monotonic
_Event = tuple[str, float, int]  # ("got" | "release" | "released" | "woken", t, me)
#: One process's turns: (url, key prefix, its number, turns, the start event, its pipe)
_Child = Callable[[str, str, int, int, "Event", "Connection[object, object]"], None]


def run(suite: Suite, url: str, run_id: str, repeats: int) -> None:
    """Interleaved runs of keylock and python-redis-lock; one row per segment and subject
    (the median of each run's p50), p99 in the notes."""
    turns = 300 if suite.quick else 2_000
    subjects: list[tuple[str, _Child]] = [("keylock RedisBackend (sync)", _keylock)]
    try:
        import redis_lock  # noqa: F401

        subjects.append(("python-redis-lock", _redis_lock))
    except ImportError:
        suite.say("python-redis-lock: not installed, skipped")
    p99: dict[tuple[str, str], list[float]] = {}
    p50: dict[tuple[str, str], list[float]] = {}

    for _ in range(repeats):  # interleaved, so drift hits both alike
        for name, target in subjects:
            parts = _split(_turns(target, url, f"{run_id}:hops:{uuid.uuid4().hex[:8]}", turns))
            for segment, values in zip(SEGMENTS, parts, strict=True):
                ordered = sorted(values) or [0.0]
                p50.setdefault((name, segment), []).append(statistics.median(ordered) * 1e6)
                worst = ordered[int(len(ordered) * 0.99)] * 1e6
                p99.setdefault((name, segment), []).append(worst)
    for segment in SEGMENTS:
        for name, _ in subjects:
            worst = statistics.median(p99[(name, segment)])
            suite.add(
                Row.of(
                    f"{FAMILY}: {segment}",
                    name,
                    "us (p50)",
                    p50[(name, segment)],
                    notes=f"p99 {worst:,.0f} us (median over the runs)",
                    extra={"p99_us": worst},
                )
            )


def _turns(target: _Child, url: str, prefix: str, turns: int) -> list[_Event]:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    pipes, children = [], []
    for me in (1, 2):
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=target, args=(url, prefix, me, turns, start, send), daemon=True)
        child.start()
        send.close()
        pipes.append(receive)
        children.append(child)
    events: list[_Event] = []
    try:
        for receive in pipes:  # each child says when it has connected
            if not receive.poll(60) or receive.recv() != "ready":
                raise RuntimeError("a hand-off benchmark worker did not start")
        start.set()
        for receive in pipes:
            if not receive.poll(300):
                raise RuntimeError("a hand-off benchmark worker sent no result")
            events += receive.recv()
    finally:
        for child in children:
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
        for receive in pipes:
            receive.close()
    return sorted(events, key=lambda event: event[1])


def _split(events: list[_Event]) -> tuple[list[float], ...]:
    """Per hand-off (a release by one process, the next grant to the other): the release
    call, release to the wake-up read, wake-up to the grant, and release to the grant."""
    calls: list[float] = []
    to_wake: list[float] = []
    to_grant: list[float] = []
    whole: list[float] = []
    releasing: dict[int, float] = {}
    last_release: tuple[float, int] | None = None
    woken: dict[int, float] = {}
    for kind, at, me in events:
        if kind == "release":
            releasing[me] = at
            last_release = (at, me)
        elif kind == "released" and me in releasing:
            calls.append(at - releasing.pop(me))
        elif kind == "woken":
            woken[me] = at
        elif kind == "got" and last_release is not None and last_release[1] != me:
            released_at = last_release[0]
            whole.append(at - released_at)
            wake = woken.pop(me, None)
            if wake is not None and wake >= released_at:
                to_wake.append(wake - released_at)
                to_grant.append(at - wake)
            last_release = None
    return calls, to_wake, to_grant, whole


def _keylock(
    url: str, prefix: str, me: int, turns: int, start: Event, conn: Connection[object, object]
) -> None:
    events: list[_Event] = []
    deliver = _listener.Waiting.deliver

    def timed(self: _listener.Waiting, hand_off: HandOff) -> None:
        events.append(("woken", _clock(), me))
        deliver(self, hand_off)

    _listener.Waiting.deliver = timed  # type: ignore[method-assign]  # this child only
    locks = KeyedLock(RedisBackend.from_url(url, prefix=prefix))
    with locks.sync(f"warm-up:{me}"):
        pass
    conn.send("ready")
    start.wait()
    for _ in range(turns):
        lease = locks.acquire_sync("hot")
        events.append(("got", _clock(), me))
        events.append(("release", _clock(), me))
        lease.release_sync()
        events.append(("released", _clock(), me))
    locks.close_sync()
    conn.send(events)


def _redis_lock(
    url: str, prefix: str, me: int, turns: int, start: Event, conn: Connection[object, object]
) -> None:
    import redis_lock

    events: list[_Event] = []
    client = redis.Redis.from_url(url)
    blpop = client.blpop

    def timed(*args: object, **kwargs: object) -> object:
        reply = blpop(*args, **kwargs)  # type: ignore[arg-type]
        events.append(("woken", _clock(), me))
        return reply

    client.blpop = timed  # type: ignore[method-assign,assignment]  # this child's client only
    client.ping()
    conn.send("ready")
    start.wait()
    for _ in range(turns):
        lock = redis_lock.Lock(client, f"{prefix}:hot", expire=30)
        lock.acquire()
        events.append(("got", _clock(), me))
        events.append(("release", _clock(), me))
        lock.release()
        events.append(("released", _clock(), me))
    client.close()
    conn.send(events)
