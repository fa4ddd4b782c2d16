"""The Postgres permit statements (semaphores, RW locks) against a real server, one call at a
time: capacity, FIFO across weights, one token counter per key, limit mismatch, lapse and
take-over, hand-off by NOTIFY carrying the grants, leave, release marks, renew and statistics.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import cast

import psycopg
import pytest

from keylock.backends.postgres._permit_sql import permit_schema_for
from keylock.backends.postgres._sql import schema_for

from .._pg_server import PgServer

TABLE = "permit_sql_test"
RW = 1 << 30
CHANNEL = "keylock_permit_sql_test"
Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture
def conn(postgres_server: PgServer) -> Iterator[Conn]:
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        with conn.transaction():
            for statement in schema_for(TABLE).ddl:
                conn.execute(statement)
        conn.execute(
            f"TRUNCATE {TABLE}, {TABLE}_queue, {TABLE}_permit_keys, {TABLE}_permits, "
            f"{TABLE}_permit_queue"
        )
        yield conn


@pytest.fixture
def listener(postgres_server: PgServer) -> Iterator[Conn]:
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f'LISTEN "{CHANNEL}"')
        yield conn


SQL = permit_schema_for(TABLE)


def as_bytes(value: object) -> bytes:
    return bytes(cast("bytes", value))


def owner() -> bytes:
    return os.urandom(16)


def acquire(
    conn: Conn,
    who: bytes,
    limit: int,
    weight: int = 1,
    *,
    key: bytes = b"k",
    ttl_ms: int = 10_000,
    queue: bool = True,
    stay_ms: int = 10_000,
    claim_ms: int = 3_000,
) -> tuple[int, int, int, bool | None]:
    row = conn.execute(
        SQL.acquire, (key, who, limit, weight, ttl_ms, queue, stay_ms, claim_ms, CHANNEL)
    ).fetchone()
    assert row is not None
    status, token, ms_left, took = row
    assert isinstance(status, int)
    assert isinstance(token, int)
    return status, token, ms_left, took  # type: ignore[return-value]


def granted(conn: Conn, who: bytes, limit: int, weight: int = 1, **kw: object) -> int:
    status, token, _, _ = acquire(conn, who, limit, weight, **kw)  # type: ignore[arg-type]
    assert status == 1, (status, token)
    return token


def release(conn: Conn, who: bytes, token: int, key: bytes = b"k") -> bool:
    row = conn.execute(SQL.release, (key, who, token)).fetchone()
    assert row is not None
    return bool(row[0])


def leave(conn: Conn, who: bytes, key: bytes = b"k") -> None:
    conn.execute(SQL.leave, (key, who))


def handed(listener: Conn, count: int) -> dict[bytes, tuple[int, int, int, int]]:
    """The next *count* hand-offs NOTIFYed (bounded wait): owner -> (token, µs, claim, took)."""
    found: dict[bytes, tuple[int, int, int, int]] = {}
    deadline = time.monotonic() + 5
    while len(found) < count and time.monotonic() < deadline:
        for notify in listener.notifies(timeout=0.2, stop_after=count - len(found)):
            owner_hex, token, at_us, claim, took = notify.payload.split(" ")
            found[bytes.fromhex(owner_hex)] = (int(token), int(at_us), int(claim), int(took))
    return found


def no_hand_off(listener: Conn) -> bool:
    return not list(listener.notifies(timeout=0.1))


def statistics(conn: Conn, key: bytes = b"k") -> tuple[object, ...]:
    row = conn.execute(SQL.statistics, (key,)).fetchone()
    assert row is not None
    return tuple(row)


def past(conn: Conn, who: bytes, table: str = "permits", column: str = "expires_at") -> None:
    """Wait (bounded poll) until the server's clock passes *who*'s permit's expiry (or its
    place in line's ``stay_until``)."""
    sql = f"SELECT {column} <= clock_timestamp() FROM {TABLE}_{table} WHERE owner = %s"
    deadline = time.monotonic() + 5
    while True:
        row = conn.execute(sql, (who,)).fetchone()
        assert row is not None
        if row[0] or time.monotonic() > deadline:
            assert row[0]
            return
        time.sleep(0.005)


def server_us(conn: Conn) -> int:
    row = conn.execute(
        "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
    ).fetchone()
    assert row is not None
    return cast("int", row[0])


def test_capacity_is_never_exceeded_and_tokens_rise_across_weights(conn: Conn) -> None:
    """Three permits of limit 3 are granted, the fourth is not (a try leaves no trace); every
    token is above the last and floored at the server clock in µs."""
    before = server_us(conn)
    who = [owner() for _ in range(4)]
    tokens = [granted(conn, w, 3) for w in who[:3]]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 3
    assert tokens[0] >= before
    status, _, ms_left, _ = acquire(conn, who[3], 3, queue=False)
    assert status == 0
    assert 0 < ms_left <= 10_000
    assert statistics(conn)[3:] == (3, 3, 0)  # holders, weight held, waiting
    assert release(conn, who[0], tokens[0])
    assert granted(conn, who[3], 3) > tokens[2]


def test_tokens_keep_rising_after_the_tables_are_truncated(conn: Conn) -> None:
    first = owner()
    token = granted(conn, first, 2)
    assert release(conn, first, token)
    conn.execute(f"TRUNCATE {TABLE}_permit_keys, {TABLE}_permits, {TABLE}_permit_queue")
    assert granted(conn, owner(), 2) > token


def test_a_writer_waits_for_readers_and_blocks_readers_after_it(conn: Conn, listener: Conn) -> None:
    """FIFO across weights: a queued writer keeps later readers out (a try and a queued
    reader alike); the last reader's release hands the key to the writer by NOTIFY with a
    token above every reader's; the writer's release hands it to both queued readers at once."""
    r1, r2, w, r3, r4 = (owner() for _ in range(5))
    t1, t2 = granted(conn, r1, RW), granted(conn, r2, RW)
    assert acquire(conn, w, RW, RW)[0] == 0  # the writer queues
    assert acquire(conn, r3, RW, queue=False)[0] == 0  # a try: someone waits
    assert acquire(conn, r3, RW)[0] == 0  # behind the writer
    assert acquire(conn, r4, RW)[0] == 0
    assert statistics(conn)[3:] == (2, 2, 3)
    assert release(conn, r1, t1)
    assert no_hand_off(listener)  # r2 still reads
    assert release(conn, r2, t2)
    (writer,) = handed(listener, 1).items()
    assert writer[0] == w
    assert writer[1][0] > t2
    assert writer[1][2] == 3_000
    # the writer comes back to take it (as when its message arrived with too little time)
    status, token, _, _ = acquire(conn, w, RW, RW)
    assert (status, token) == (1, writer[1][0])
    assert release(conn, w, token)
    readers = handed(listener, 2)
    assert set(readers) == {r3, r4}
    assert all(grant[0] > token for grant in readers.values())
    assert statistics(conn)[3:] == (2, 2, 0)


def test_a_reader_that_fits_waits_behind_an_earlier_writer_with_the_writer_leaving(
    conn: Conn, listener: Conn
) -> None:
    """A queued writer that gives up lets the readers queued behind it in, at once."""
    r1, w, r2 = owner(), owner(), owner()
    granted(conn, r1, RW)
    assert acquire(conn, w, RW, RW)[0] == 0
    assert acquire(conn, r2, RW)[0] == 0
    leave(conn, w)
    assert set(handed(listener, 1)) == {r2}


def test_a_heavy_waiter_blocks_lighter_ones_behind_it(conn: Conn, listener: Conn) -> None:
    """Limit 3, 2 held, weight 2 in line: a weight 1 that would fit waits behind it; the
    release that makes room for the head grants the head and the next that fits with it."""
    a, heavy, light = owner(), owner(), owner()
    ta = granted(conn, a, 3, 2)
    assert acquire(conn, heavy, 3, 2)[0] == 0
    assert acquire(conn, light, 3, 1)[0] == 0  # 2 + 1 fits, but the heavy one came first
    assert acquire(conn, light, 3, 1)[0] == 0  # and at its next try too
    assert no_hand_off(listener)
    assert release(conn, a, ta)
    assert set(handed(listener, 2)) == {heavy, light}  # 2 + 1 = 3


def test_another_limit_is_refused_while_anyone_holds_or_waits(conn: Conn) -> None:
    """The recorded limit is named in the refusal; nothing is granted or queued by it; once
    the last holder and waiter are gone, a new limit is recorded."""
    a, b, c = owner(), owner(), owner()
    ta = granted(conn, a, 3)
    assert acquire(conn, b, 2)[:2] == (-1, 3)
    assert acquire(conn, b, 4, queue=False)[:2] == (-1, 3)
    assert statistics(conn)[3:] == (1, 1, 0)
    tb = granted(conn, b, 3)
    assert release(conn, a, ta)
    assert acquire(conn, c, 1)[:2] == (-1, 3)
    assert release(conn, b, tb)
    assert statistics(conn)[0] is None  # the record went with the last holder
    assert granted(conn, c, 1) > tb


def test_a_waiter_alone_keeps_the_limit_recorded(conn: Conn) -> None:
    a, w = owner(), owner()
    granted(conn, a, 1, 1)
    assert acquire(conn, w, 1, 1)[0] == 0
    assert acquire(conn, owner(), 2)[:2] == (-1, 1)


def test_a_lapsed_permit_is_taken_over_once_and_its_release_is_refused(conn: Conn) -> None:
    """A permit whose TTL ran out frees its weight: the next grant took it over (exactly one
    grant per lapsed permit), and the late release answers False (LeaseLost)."""
    dead, a, b = owner(), owner(), owner()
    token = granted(conn, dead, 2, ttl_ms=50)
    granted(conn, owner(), 2)
    assert acquire(conn, a, 2, queue=False)[0] == 0
    past(conn, dead)
    status, _, _, took = acquire(conn, a, 2, queue=False)
    assert (status, took) == (1, True)
    assert not release(conn, dead, token)
    # the late release does not count twice: a release frees the next grant without take-over
    assert acquire(conn, b, 2, queue=False)[0] == 0


def test_a_lapse_hands_off_to_the_waiter_at_its_next_try(conn: Conn) -> None:
    """A waiter told when the first permit lapses (ms left) gets it at that try."""
    dead, w = owner(), owner()
    granted(conn, dead, 1, ttl_ms=80)
    status, _, ms_left, _ = acquire(conn, w, 1)
    assert status == 0
    assert 0 < ms_left <= 80
    past(conn, dead)  # what the flow's wait of ms_left (+ 2 ms) is for
    status, _, _, took = acquire(conn, w, 1)
    assert (status, took) == (1, True)


def test_a_writer_took_over_every_lapsed_reader_at_once(conn: Conn) -> None:
    readers = [owner() for _ in range(3)]
    for r in readers:
        granted(conn, r, RW, ttl_ms=30)
    for r in readers:
        past(conn, r)
    assert acquire(conn, owner(), RW, RW)[3] is True
    assert release(conn, *_only_holder(conn))
    assert acquire(conn, owner(), RW)[3] is False


def _only_holder(conn: Conn) -> tuple[bytes, int]:
    row = conn.execute(
        f"SELECT owner, token FROM {TABLE}_permits WHERE owner IS NOT NULL"
    ).fetchall()
    assert len(row) == 1
    return as_bytes(row[0][0]), cast("int", row[0][1])


def test_release_is_by_owner_and_token_and_a_repeat_answers_released(conn: Conn) -> None:
    a = owner()
    token = granted(conn, a, 2)
    assert not release(conn, a, token + 1)
    assert not release(conn, owner(), token)
    assert release(conn, a, token)
    assert release(conn, a, token)  # a retry after the reply was lost
    assert statistics(conn)[3:] == (0, 0, 0)


def test_an_unused_grant_given_back_passes_on(conn: Conn, listener: Conn) -> None:
    """A waiter handed a permit that gives up leaves no permit behind; the next waiter gets it."""
    a, w1, w2 = owner(), owner(), owner()
    ta = granted(conn, a, 1)
    assert acquire(conn, w1, 1)[0] == 0
    assert acquire(conn, w2, 1)[0] == 0
    assert release(conn, a, ta)
    assert set(handed(listener, 1)) == {w1}
    leave(conn, w1)
    assert set(handed(listener, 1)) == {w2}
    assert statistics(conn)[3:] == (1, 1, 0)


def test_an_acquire_after_a_hand_off_is_the_grant_itself(conn: Conn, listener: Conn) -> None:
    a, w = owner(), owner()
    ta = granted(conn, a, 1)
    assert acquire(conn, w, 1)[0] == 0
    assert release(conn, a, ta)
    token = handed(listener, 1)[w][0]
    assert granted(conn, w, 1) == token
    assert statistics(conn)[3:] == (1, 1, 0)


def test_a_dead_waiter_drops_out_of_the_line(conn: Conn, listener: Conn) -> None:
    a, dead, live = owner(), owner(), owner()
    ta = granted(conn, a, 1)
    assert acquire(conn, dead, 1, stay_ms=30)[0] == 0
    assert acquire(conn, live, 1)[0] == 0
    past(conn, dead, "permit_queue", "stay_until")
    assert release(conn, a, ta)
    assert set(handed(listener, 1)) == {live}


def test_extend_and_renew_only_a_live_permit_of_its_owner(conn: Conn) -> None:
    a, b = owner(), owner()
    ta = granted(conn, a, 2, ttl_ms=40)
    tb = granted(conn, b, 2, ttl_ms=40)
    assert conn.execute(SQL.extend, (5_000, b"k", a, ta)).fetchall() == [(1,)]
    assert conn.execute(SQL.extend, (5_000, b"k", a, tb)).fetchall() == []
    rows = conn.execute(SQL.renew, ([b"k", b"k", b"k"], [a, b, owner()], [60, 60, 60]))
    assert {as_bytes(row[0]) for row in rows.fetchall()} == {a, b}
    past(conn, b)
    assert conn.execute(SQL.extend, (5_000, b"k", b, tb)).fetchall() == []
    assert conn.execute(SQL.renew, ([b"k"], [b], [60])).fetchall() == []


def test_renew_covers_locks_and_permits_in_one_statement(conn: Conn) -> None:
    lock = schema_for(TABLE)
    holder, permit = owner(), owner()
    row = conn.execute(lock.acquire, (b"k", holder, 10_000, False, 1, 1, CHANNEL)).fetchone()
    assert row is not None
    assert row[0] == 1
    granted(conn, permit, 2)
    rows = conn.execute(SQL.renew, ([b"k", b"k"], [holder, permit], [60_000, 60_000]))
    assert {as_bytes(r[0]) for r in rows.fetchall()} == {holder, permit}


def test_the_lock_and_permit_keyspaces_are_apart(conn: Conn) -> None:
    lock = schema_for(TABLE)
    row = conn.execute(lock.acquire, (b"k", owner(), 10_000, False, 1, 1, CHANNEL)).fetchone()
    assert row is not None
    assert row[0] == 1
    granted(conn, owner(), 1)


def test_statistics_name_the_newest_holder(conn: Conn) -> None:
    assert statistics(conn) == (None, None, None, 0, 0, 0)
    a, b = owner(), owner()
    granted(conn, a, 3)
    tb = granted(conn, b, 3, 2)
    limit, newest, token, holders, used, waiting = statistics(conn)
    assert (limit, as_bytes(newest), token, holders, used, waiting) == (3, b, tb, 2, 3, 0)


def test_a_take_over_owed_is_given_once_when_heads_are_served_at_a_try(
    conn: Conn, listener: Conn
) -> None:
    """A lapse found by a newcomer's acquire is owed to the head it lets in (took over); the
    newcomer, queued behind another waiter, does not write the old count back: the grant
    after the head's did not take anything over. (Failed when the acquire kept the key's
    record read before serving the heads.)"""
    dead, head, second, late = owner(), owner(), owner(), owner()
    granted(conn, dead, 1, ttl_ms=40)
    assert acquire(conn, head, 1)[0] == 0
    assert acquire(conn, second, 1)[0] == 0
    past(conn, dead)
    assert acquire(conn, late, 1)[0] == 0  # finds the lapse, serves the head, queues itself
    assert handed(listener, 1)[head][3] == 1
    token = granted(conn, head, 1)
    assert release(conn, head, token)
    assert handed(listener, 1)[second][3] == 0
