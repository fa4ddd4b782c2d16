"""Operator actions on a Postgres lock table (``keylock inspect`` and ``keylock release
--force``): what is held now, and breaking one lease, only the one that was shown."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from ._sql import schema_for, stored

if TYPE_CHECKING:
    import psycopg

__all__ = ["force_release", "held"]

Held = tuple[bytes, bytes, int, float, int]  # key, owner, token, seconds left, live waiters


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
    (NOTIFYed, as at any release). With ``owner=None``, the holder seen now. True if a live
    lease was broken; False when the key is free, expired, or another owner holds it. The
    holder is not told until its next renewal or release (``lease.lost``, LeaseLost): its
    writes must be fenced. Runs on *conn* as it is (commit unless it is in autocommit), with
    a durable commit."""
    schema = schema_for(table, durable=True)
    name = stored(key)
    if not _exists(conn, schema.table):
        return False
    if owner is None:
        row = conn.execute(
            f"SELECT owner FROM {schema.table} WHERE key = %s AND owner IS NOT NULL", (name,)
        ).fetchone()
        if row is None:
            return False
        owner = bytes(cast("bytes", row[0]))
    elif isinstance(owner, str):
        owner = bytes.fromhex(owner)
    with conn.transaction():
        row = conn.execute(schema.release, (name, owner)).fetchone()
        # the release mark answers a holder's repeated release "released": this release was
        # not the holder's, whose own release must report the lease lost
        conn.execute(
            f"UPDATE {schema.table} SET released = array_remove(released, %s) WHERE key = %s",
            (owner, name),
        )
    return bool(row and row[0])
