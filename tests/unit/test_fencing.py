"""Fencing helpers: the store rejects stale tokens, atomically, on Redis and in SQL."""

from __future__ import annotations

import math
import sqlite3
from typing import cast

import pytest
import redis

from keylock import StaleToken
from keylock.fencing import fenced_get_sync, fenced_set, fenced_set_sync, fenced_update

from .._redis_server import Cluster, Server


@pytest.fixture
def client(redis_server: Server) -> redis.Redis:
    redis_server.flush()
    return redis.Redis.from_url(redis_server.url)


def test_redis_fence_accepts_equal_or_newer_and_rejects_older(client: redis.Redis) -> None:
    fenced_set_sync(client, "invoice:7", 10, "first")
    fenced_set_sync(client, "invoice:7", 10, "again, same lease")
    fenced_set_sync(client, "invoice:7", 12, "newer holder")
    with pytest.raises(StaleToken) as info:
        fenced_set_sync(client, "invoice:7", 11, "stale writer")
    assert info.value.key == "invoice:7"
    assert "12" in str(info.value)
    assert fenced_get_sync(client, "invoice:7") == (b"newer holder", 12)  # nothing changed


async def test_redis_fence_async_twin(redis_server: Server) -> None:
    import redis.asyncio

    redis_server.flush()
    client = redis.asyncio.Redis.from_url(redis_server.url)
    await fenced_set(client, "r", 5, "v5")
    with pytest.raises(StaleToken):
        await fenced_set(client, "r", 4, "v4")
    assert await client.get("keylock:fenced:{r}") == b"v5"
    await client.aclose()


async def test_a_client_of_the_other_flavour_is_refused_before_any_write(
    client: redis.Redis, redis_server: Server
) -> None:
    """A sync client given to the async twin (or the reverse) is a TypeError naming the twin
    to call, and nothing is written. Fails on the old code: fenced_set wrote with the sync
    client, then raised "object list can't be used in 'await' expression", so a caller told
    the write failed found it done."""
    import redis.asyncio

    from keylock.fencing import fenced_get

    with pytest.raises(TypeError, match="call fenced_set_sync with it"):
        await fenced_set(client, "invoice:9", 5, "written?")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="call fenced_get_sync with it"):
        await fenced_get(client, "invoice:9")  # type: ignore[arg-type]
    assert fenced_get_sync(client, "invoice:9") == (None, None)  # nothing was written
    aclient = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        with pytest.raises(TypeError, match="call fenced_set with it"):
            fenced_set_sync(aclient, "invoice:9", 5, "written?")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="call fenced_get with it"):
            fenced_get_sync(aclient, "invoice:9")  # type: ignore[arg-type]
    finally:
        await aclient.aclose()
    assert fenced_get_sync(client, "invoice:9") == (None, None)


def test_sql_fence_pattern_with_sqlite() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT, fence INTEGER)")
    db.execute("INSERT INTO jobs VALUES (1, 'queued', 0)")
    fenced_update(db, "jobs", 1, 100, {"status": "running"})
    fenced_update(db, "jobs", 1, 205, {"status": "done"})
    with pytest.raises(StaleToken):
        fenced_update(db, "jobs", 1, 150, {"status": "cancelled"})  # the stale worker
    with pytest.raises(StaleToken):
        fenced_update(db, "jobs", 2, 999, {"status": "x"})  # no such row
    assert db.execute("SELECT status, fence FROM jobs WHERE id = 1").fetchone() == ("done", 205)
    with pytest.raises(ValueError, match="identifier"):
        fenced_update(db, "jobs; DROP TABLE jobs", 1, 300, {"status": "x"})


async def test_fenced_get_async_twin(redis_server: Server) -> None:
    import redis.asyncio

    from keylock.fencing import fenced_get

    redis_server.flush()
    client = redis.asyncio.Redis.from_url(redis_server.url)
    assert await fenced_get(client, "g") == (None, None)
    await fenced_set(client, "g", 7, "seven")
    assert await fenced_get(client, "g") == (b"seven", 7)
    await client.aclose()


def test_an_unreachable_store_is_backend_unavailable() -> None:
    from keylock import BackendUnavailable

    from .._redis_server import free_port

    client = redis.Redis(port=free_port())
    with pytest.raises(BackendUnavailable, match="invoice:9") as info:
        fenced_set_sync(client, "invoice:9", 1, "x")
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    with pytest.raises(BackendUnavailable):
        fenced_get_sync(client, "invoice:9")


def test_fenced_writes_on_a_cluster_even_with_braces_in_the_name(redis_cluster: Cluster) -> None:
    """The value and its fence share one hash tag, also for names with braces (a raw
    ``{name}`` tag would split them across slots: CROSSSLOT)."""
    import redis.cluster

    redis_cluster.flush()
    client = redis.cluster.RedisCluster(host=redis_cluster.host, port=redis_cluster.port)
    for name in ("invoice:7", "a}b", "{x}"):
        fenced_set_sync(client, name, 10, "ten")
        with pytest.raises(StaleToken):
            fenced_set_sync(client, name, 9, "nine")
        assert fenced_get_sync(client, name) == (b"ten", 10)  # type: ignore[arg-type]
    client.close()


# ------------------------------------------------------------------ tokens checked exactly


class _NoIO:
    """A client or connection that fails the test if anything reaches it."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"I/O reached the store ({name}) for a bad argument")


@pytest.mark.parametrize(
    ("token", "error"),
    [
        ("abc", TypeError),
        (None, TypeError),
        (True, TypeError),
        (1.5, TypeError),
        (100.0, TypeError),
        (math.nan, TypeError),
        (math.inf, TypeError),
        (-5, ValueError),
        (2**63, ValueError),
        (2**64, ValueError),
    ],
)
def test_bad_tokens_are_refused_before_any_io(token: object, error: type[Exception]) -> None:
    """Row 11/38 (adv_31, adv_32): the old code sent "abc"/None/True to Redis and blamed the
    server (BackendUnavailable), and stored NaN, inf, -5 and 2**64 as fences."""
    client = cast("redis.Redis", _NoIO())
    with pytest.raises(error, match="invoice:1"):
        fenced_set_sync(client, "invoice:1", token, "v")  # type: ignore[arg-type]
    with pytest.raises(error, match="jobs:1"):
        fenced_update(cast("sqlite3.Connection", _NoIO()), "jobs", 1, token, {"s": 1})  # type: ignore[arg-type]


def test_bad_values_are_refused_before_any_io() -> None:
    client = cast("redis.Redis", _NoIO())
    for value in (None, {"a": 1}, True):
        with pytest.raises(TypeError, match="invoice:1"):
            fenced_set_sync(client, "invoice:1", 5, value)  # type: ignore[arg-type]


def test_a_poisoned_stored_fence_lets_no_stale_write_through(client: redis.Redis) -> None:
    """Row 11 (adv_32): a fence stored as 'nan' (by an older version, or by hand) made every
    later write pass, stale ones included, on the old code (Lua: any comparison with NaN is
    false). Now every write is refused until the fence is repaired, and the message says so."""
    fenced_set_sync(client, "inv:1", 100, "v100")
    for poison in (b"nan", b"inf", b"1.5", b"-5", b"1e+20", b"0100", b""):
        client.set("keylock:fenced:{inv:1}:fence", poison)
        for token in (5, 100, 2**62):
            with pytest.raises(StaleToken, match="not a token"):
                fenced_set_sync(client, "inv:1", token, "STALE")
        assert client.get("keylock:fenced:{inv:1}") == b"v100"
        with pytest.raises(ValueError, match="inv:1"):
            fenced_get_sync(client, "inv:1")
    client.delete("keylock:fenced:{inv:1}:fence")  # the documented repair
    fenced_set_sync(client, "inv:1", 101, "v101")
    assert fenced_get_sync(client, "inv:1") == (b"v101", 101)


def test_tokens_above_2_to_the_53_compare_exactly(client: redis.Redis) -> None:
    """Row 11 (adv_32): the old script compared tokens as Lua doubles: 2**60 + 1 and 2**60 are
    the same double, so the stale 2**60 was accepted after 2**60 + 1."""
    big = 2**60
    fenced_set_sync(client, "inv:3", big + 1, "new")
    with pytest.raises(StaleToken, match=str(big + 1)):
        fenced_set_sync(client, "inv:3", big, "STALE")
    fenced_set_sync(client, "inv:3", big + 1, "same lease again")
    fenced_set_sync(client, "inv:3", 2**63 - 1, "newest")
    with pytest.raises(StaleToken):
        fenced_set_sync(client, "inv:3", 2**63 - 2, "STALE")
    assert fenced_get_sync(client, "inv:3") == (b"newest", 2**63 - 1)
    # shorter (fewer digits) is older; longer is newer
    fenced_set_sync(client, "inv:4", 1000, "a")
    with pytest.raises(StaleToken):
        fenced_set_sync(client, "inv:4", 999, "b")
    fenced_set_sync(client, "inv:4", 10000, "c")
    fenced_set_sync(client, "inv:5", 0, "zero")
    fenced_set_sync(client, "inv:5", 0, "zero again")
    assert fenced_get_sync(client, "inv:5") == (b"zero again", 0)


# ----------------------------------------------------------------------- SQL fences


def _jobs() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT, beat INTEGER,"
        " fence INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute("INSERT INTO jobs (id, status, beat) VALUES (1, 'QUEUED', 0)")
    return db


def test_sql_a_lease_writes_again_with_its_own_token_never_an_older_one() -> None:
    """Issue 11 point 6, issue 16 finding 9: the old code (``fence < :token``) let each token
    write once: a heartbeat then the terminal write of the same lease raised StaleToken with
    the false message "a newer token already wrote it"."""
    db = _jobs()
    assert fenced_update(db, "jobs", 1, 100, {"status": "RUNNING"}) is True
    assert fenced_update(db, "jobs", 1, 100, {"beat": 1}) is True  # heartbeat, same lease
    assert fenced_update(db, "jobs", 1, 100, {"status": "DONE"}) is True  # terminal write
    assert db.execute("SELECT status, beat, fence FROM jobs").fetchone() == ("DONE", 1, 100)
    with pytest.raises(StaleToken, match="token 100 already wrote") as info:
        fenced_update(db, "jobs", 1, 99, {"status": "FAILED"})
    assert info.value.key == "jobs:1"
    with pytest.raises(StaleToken, match="no such row"):
        fenced_update(db, "jobs", 2, 100, {"status": "x"})
    assert db.execute("SELECT status, fence FROM jobs").fetchone() == ("DONE", 100)


def test_sql_where_is_a_compare_and_set_that_reports_which_check_failed() -> None:
    """Issue 11 point 6: ``where=`` did not exist (TypeError on the old code). The fence failing
    raises StaleToken; the fence passing but *where* not matching returns False."""
    db = _jobs()
    fenced_update(db, "jobs", 1, 100, {"status": "RUNNING"})
    assert fenced_update(db, "jobs", 1, 100, {"status": "DONE"}, where={"status": "RUNNING"})
    # the saga's second terminal write: fence passes, status no longer RUNNING
    assert (
        fenced_update(db, "jobs", 1, 100, {"status": "FAILED"}, where={"status": "RUNNING"})
        is False
    )
    assert fenced_update(db, "jobs", 1, 200, {"beat": 7}, where={"status": "RUNNING"}) is False
    assert db.execute("SELECT status, beat, fence FROM jobs").fetchone() == ("DONE", 0, 100)
    with pytest.raises(StaleToken, match="token 100 already wrote"):
        fenced_update(db, "jobs", 1, 50, {"status": "X"}, where={"status": "DONE"})
    # the same column may be compared and set
    assert fenced_update(db, "jobs", 1, 200, {"status": "ARCHIVED"}, where={"status": "DONE"})
    assert db.execute("SELECT status, fence FROM jobs").fetchone() == ("ARCHIVED", 200)


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"values": {}}, ValueError, "non-empty"),
        ({"table": "jobs; DROP TABLE jobs"}, ValueError, "identifier"),
        ({"values": {"status = 'x', fence": 1}}, ValueError, "identifier"),
        ({"values": {"fence": 9}}, ValueError, "may not set"),
        ({"where": {"1=1 OR status": "x"}}, ValueError, "identifier"),
        ({"where": {"status": None}}, ValueError, "None"),
        ({"fence_column": "fence--"}, ValueError, "identifier"),
        ({"id_column": 3}, TypeError, "str"),
    ],
)
def test_sql_bad_arguments_are_refused_before_any_sql(
    arguments: dict[str, object], error: type[Exception], match: str
) -> None:
    """Row 38 (adv_31): ``values={}`` reached sqlite as a syntax error on the old code."""
    call: dict[str, object] = {"table": "jobs", "values": {"status": "x"}, **arguments}
    table, values = call.pop("table"), call.pop("values")
    with pytest.raises(error, match=match):
        fenced_update(cast("sqlite3.Connection", _NoIO()), table, 1, 5, values, **call)  # type: ignore[arg-type]


def test_sql_a_null_fence_is_reported() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER, fence INTEGER)")
    db.execute("INSERT INTO t (id, v) VALUES (1, 0)")
    with pytest.raises(ValueError, match="NULL"):
        fenced_update(db, "t", 1, 5, {"v": 1})
