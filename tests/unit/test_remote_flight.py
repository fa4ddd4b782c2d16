"""SingleFlight(RedisBackend): every caller of one run, the leader's included, gets the same
outcome, as the serializer decodes it; a result the serializer cannot encode is one TypeError
for every caller and the work runs once.

Each caller has a backend (a client) of its own, as separate processes would. The leader's
work waits until every follower is queued for its lease (a bounded poll), never on a sleep.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from keylock import SingleFlight
from keylock.backends import RedisBackend

from .._redis_server import Server

CALLERS = 4
TYPED = {"ids": (1, 2, 3), "by_id": {7: "seven"}}
DECODED = {"ids": [1, 2, 3], "by_id": {"7": "seven"}}


@pytest.fixture
def url(redis_server: Server) -> str:
    redis_server.flush()
    return redis_server.url


def _flights(url: str) -> list[SingleFlight]:
    return [SingleFlight(RedisBackend.from_url(url)) for _ in range(CALLERS)]


def _backend(flight: SingleFlight) -> RedisBackend:
    return flight._remote._backend  # type: ignore[union-attr,attr-defined,no-any-return]


def _queued(followers: list[SingleFlight], key: str) -> bool:
    """Whether every follower waits for the leader's lease on *key*."""
    return all(
        flight._remote._locks.statistics(f"flight:{key}").waiting == 1  # type: ignore[union-attr,attr-defined]
        for flight in followers
    )


async def _run_async(url: str, key: str, result: object) -> list[object]:
    """How often the work ran, then the outcome of each caller (value or exception)."""
    flights = _flights(url)
    runs = 0

    async def work() -> object:
        nonlocal runs
        runs += 1
        deadline = time.monotonic() + 10
        while not _queued(flights[1:], key) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return result

    leader = asyncio.create_task(flights[0].do(key, work))
    while runs == 0:
        await asyncio.sleep(0.001)
    followers = [asyncio.create_task(flight.do(key, work)) for flight in flights[1:]]
    outcomes = await asyncio.gather(leader, *followers, return_exceptions=True)
    for flight in flights:
        await _backend(flight).close()
    return [runs, *outcomes]


def _run_sync(url: str, key: str, result: object) -> list[object]:
    flights = _flights(url)
    runs = 0
    started = threading.Event()
    outcomes: list[object] = [None] * len(flights)

    def work() -> object:
        nonlocal runs
        runs += 1
        started.set()
        deadline = time.monotonic() + 10
        while not _queued(flights[1:], key) and time.monotonic() < deadline:
            time.sleep(0.005)
        return result

    def call(n: int) -> None:
        try:
            outcomes[n] = flights[n].do_sync(key, work)
        except Exception as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    assert started.wait(10)
    threads += [threading.Thread(target=call, args=(n,)) for n in range(1, len(flights))]
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(30)
    for flight in flights:
        _backend(flight).close_sync()
    return [runs, *outcomes]


RUN: dict[str, Callable[[str, str, object], list[object]]] = {
    "async": lambda url, key, result: asyncio.run(_run_async(url, key, result)),
    "sync": _run_sync,
}


@pytest.mark.parametrize("flavour", list(RUN))
def test_the_leader_gets_the_decoded_result_its_followers_get(url: str, flavour: str) -> None:
    """Row 12: a tuple and an int dict key come back from JSON as a list and a str key; the
    leader's caller now gets that decoding too. Before, it got the original object (tuple,
    int key) while every follower got the decoding: this test failed on the leader's value."""
    runs, *outcomes = RUN[flavour](url, f"types-{flavour}", TYPED)
    assert runs == 1
    assert outcomes == [DECODED] * CALLERS


@pytest.mark.parametrize("flavour", list(RUN))
def test_an_unencodable_result_runs_once_and_is_one_type_error_for_every_caller(
    url: str, flavour: str
) -> None:
    """Row 12: a set cannot go through JSON. The work runs once and every caller gets one
    TypeError naming the key and the fix. Before, the leader stored nothing, so each follower
    in turn took the lease and ran the work again (4 runs for 4 callers): this test failed on
    the run count."""
    key = f"set-{flavour}"
    runs, *outcomes = RUN[flavour](url, key, {"tags": {"a", "b"}})
    assert runs == 1
    assert all(type(outcome) is TypeError for outcome in outcomes), outcomes
    assert len({str(outcome) for outcome in outcomes}) == 1
    assert repr(key) in str(outcomes[0])
    assert "serializer=" in str(outcomes[0])


def test_a_custom_serializer_decodes_for_the_leader_too(url: str) -> None:
    """The leader's caller gets ``loads(dumps(result))`` from the bytes Redis holds, as its
    followers do, whatever the serializer (this ``loads`` shows what it was given). Before,
    the leader's caller got the result itself (7): this test failed on that."""
    backend = RedisBackend.from_url(url)
    flight = SingleFlight(backend, serializer=(repr, lambda raw: {"ok": raw}))
    assert flight.do_sync("custom", lambda: 7) == b"{'ok': 7}"
    backend.close_sync()
