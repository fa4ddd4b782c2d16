"""Operator actions on a Postgres lock table (``keylock inspect`` and ``keylock release
--force``): what is held now, locks and permits, and breaking one lease, only the one that was
shown."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from ._sql import schema_for, stored

if TYPE_CHECKING:
    import psycopg

__all__ = ["force_release", "held", "permits_held"]

Held = tuple[bytes, bytes, int, float, int]  # key, owner, token, seconds left, live waiters
# key, the newest holder's owner and token, seconds until the last permit lapses, live waiters,
# live permits, the key's recorded limit
PermitsHeld = tuple[bytes, bytes, int, float, int, int, int]


def held(
    conn: psycopg.Connection[tuple[object, ...]], *, table: str = "keylock_leases"
) -> list[Held]:
    """Every live lease in *table*, by key (none if the table does not exist yet)."""
    schema = schema_for(table)
    if not _exists(conn, schema.table):
        return []
    rows = conn.execute(
        f"SELECT l.key, l.owner, l.token, "
        f"extract(epoch FROM l.expires_at - clock_timestamp())::float8, "
        f"(SELECT count(*) FROM {schema.table}_queue AS q "
        f"WHERE q.key = l.key AND q.stay_until > clock_timestamp()) "
        f"FROM {schema.table} AS l "
        f"WHERE l.owner IS NOT NULL AND l.expires_at > clock_timestamp() ORDER BY l.key"
    ).fetchall()
    return [
        (bytes(key), bytes(owner), int(token), float(left), int(waiting))
        for key, owner, token, left, waiting in cast(
            "list[tuple[bytes, bytes, int, float, int]]", rows
        )
    ]


def permits_held(
    conn: psycopg.Connection[tuple[object, ...]], *, table: str = "keylock_leases"
) -> list[PermitsHeld]:
    """Every permit key (semaphores, RW locks) of *table* with live permits, by key: the
    newest holder, when the last permit lapses, how many wait, how many permits, the limit."""
    schema = schema_for(table)
    t = schema.table
    p, q, k = f"{t}_permits", f"{t}_permit_queue", f"{t}_permit_keys"
    if not _exists(conn, p):
        return []
    now = "clock_timestamp()"
    rows = conn.execute(
        f"SELECT h.key, newest.owner, newest.token, "
        f"extract(epoch FROM h.last - {now})::float8, "
        f"(SELECT count(*) FROM {q} AS w WHERE w.key = h.key AND w.stay_until > {now}), "
        f"h.live, coalesce((SELECT lim FROM {k} WHERE key = h.key), 0) "
        f"FROM (SELECT key, count(*) AS live, max(expires_at) AS last FROM {p} "
        f"WHERE owner IS NOT NULL AND expires_at > {now} GROUP BY key) AS h "
        f"CROSS JOIN LATERAL (SELECT owner, token FROM {p} AS n WHERE n.key = h.key "
        f"AND n.owner IS NOT NULL AND n.expires_at > {now} ORDER BY n.token DESC LIMIT 1) "
        f"AS newest ORDER BY h.key"
    ).fetchall()
    return [
        (bytes(key), bytes(owner), int(token), float(left), int(waiting), int(live), int(limit))
        for key, owner, token, left, waiting, live, limit in cast(
            "list[tuple[bytes, bytes, int, float, int, int, int]]", rows
        )
    ]


def _exists(conn: psycopg.Connection[tuple[object, ...]], table: str) -> bool:
    found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    return bool(found and found[0])


def force_release(
    conn: psycopg.Connection[tuple[object, ...]],
    key: str,
    *,
    owner: bytes | str | None = None,
    table: str = "keylock_leases",
) -> bool:
    """Free *key* (as stored: ``namespace NUL key``) only if *owner* (bytes, or hex as
    ``keylock inspect`` shows it) still holds it, and hand it to the next waiter at once
    (NOTIFYed, as at any release). *owner* may hold the key's lock or one of its permits (a
    semaphore's or an RW lock's: owner ids are never shared, so only that permit is freed, and
    the waiters that now fit are granted). With ``owner=None``, the lock's holder seen now, or
    else the newest permit's. True if a live lease was broken; False when the key is free,
    expired, or another owner holds it. The holder is not told until its next renewal or
    release (``lease.lost``, LeaseLost): its writes must be fenced. Runs on *conn* as it is
    (commit unless it is in autocommit), with a durable commit."""
    schema = schema_for(table, durable=True)
    name = stored(key)
    if not _exists(conn, schema.table):
        return False
    if owner is None:
        row = conn.execute(
            f"SELECT owner FROM {schema.table} WHERE key = %s AND owner IS NOT NULL", (name,)
        ).fetchone()
        if row is None:
            return _force_permit(conn, schema.table, name, None)
        owner = bytes(cast("bytes", row[0]))
    elif isinstance(owner, str):
        owner = bytes.fromhex(owner)
    held_lock = conn.execute(
        f"SELECT 1 FROM {schema.table} WHERE key = %s AND owner = %s", (name, owner)
    ).fetchone()
    if held_lock is None:
        return _force_permit(conn, schema.table, name, owner)
    with conn.transaction():
        row = conn.execute(schema.release, (name, owner)).fetchone()
        # the release mark answers a holder's repeated release "released": this release was
        # not the holder's, whose own release must report the lease lost
        conn.execute(
            f"UPDATE {schema.table} SET released = array_remove(released, %s) WHERE key = %s",
            (owner, name),
        )
    return bool(row and row[0])


def _force_permit(
    conn: psycopg.Connection[tuple[object, ...]], table: str, name: bytes, owner: bytes | None
) -> bool:
    """Free the live permit *owner* holds on permit key *name* (None: the newest one), as its
    release would (the waiters that now fit are granted); its holder's own release then
    reports it lost. A durable commit."""
    from ._permit_sql import permit_schema_for

    sql = permit_schema_for(table, durable=True)
    if not _exists(conn, f"{table}_permits"):
        return False
    row = conn.execute(
        f"SELECT owner, token FROM {table}_permits WHERE key = %s AND owner IS NOT NULL "
        f"AND (owner = %s OR %s IS NULL) AND expires_at > clock_timestamp() "
        f"ORDER BY token DESC LIMIT 1",
        (name, owner, owner),
    ).fetchone()
    if row is None:
        return False
    found, token = bytes(cast("bytes", row[0])), int(cast("int", row[1]))
    with conn.transaction():
        released = conn.execute(sql.release, (name, found, token)).fetchone()
        # as for a lock: the release mark is the holder's, whose own release must say lost
        conn.execute(
            f"UPDATE {table}_permit_keys SET released = array_remove(released, %s) WHERE key = %s",
            (found, name),
        )
    return bool(released and released[0])
