"""What a SingleFlight says of a key too long for it: the single-flight key and its own limit
(a flight shared through Redis holds its key under a prefix, so its limit is shorter)."""

from __future__ import annotations

import asyncio

import pytest

from keylock import MAX_KEY_LENGTH, InvalidKey, SingleFlight
from keylock.backends import RedisBackend

from .._redis_server import Server

LONGEST = MAX_KEY_LENGTH - len("flight:")  # a shared flight's leader holds "flight:<key>"


async def _one() -> int:
    return 1


def test_a_shared_flight_key_near_the_limit_names_the_flight_key_and_its_limit(
    redis_server: Server,
) -> None:
    """Through Redis, a key of LONGEST (1017) characters runs (sync and async); one of 1018 or
    1024, which the lock under the flight would refuse, is refused by SingleFlight itself
    (do, do_sync, forget) as a "single-flight key" over the 1017 allowed, saying why; an
    in-process SingleFlight still takes 1024. Fails on the old code: 1018 and 1024 passed
    SingleFlight's check and failed the lock's, "lock key 'flight:kkk...'... is 1025
    characters long, over the 1024 allowed"."""
    redis_server.flush()
    backend = RedisBackend.from_url(redis_server.url)
    flight = SingleFlight(backend)
    try:
        assert flight.do_sync("k" * LONGEST, lambda: 2) == 2
        assert asyncio.run(flight.do("k" * LONGEST, _one)) == 1
        for length in (LONGEST + 1, MAX_KEY_LENGTH):
            key = "k" * length
            for call in (
                lambda k: flight.do_sync(k, lambda: 2),
                lambda k: asyncio.run(flight.do(k, _one)),
                flight.forget,
            ):
                with pytest.raises(InvalidKey) as refused:
                    call(key)
                message = str(refused.value)
                assert message.startswith("single-flight key 'kkk"), message
                assert f"is {length} characters long, over the {LONGEST} allowed" in message
                assert "its leader holds the lock 'flight:<key>'" in message
                assert f"a lock key is at most {MAX_KEY_LENGTH} characters" in message
                assert "lock key 'flight:" not in message
                assert refused.value.key == key
    finally:
        backend.close_sync()
    alone = SingleFlight()
    assert alone.do_sync("k" * MAX_KEY_LENGTH, lambda: 3) == 3
    with pytest.raises(InvalidKey) as over:
        alone.do_sync("k" * (MAX_KEY_LENGTH + 1), lambda: 3)
    assert f"over the {MAX_KEY_LENGTH} allowed: use a short id" in str(over.value)
