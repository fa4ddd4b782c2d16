"""Storage-side fencing: the store rejects a writer whose lease token is older than one it saw.

A lease can be lost without its holder noticing in time (a GC pause, SIGSTOP, a partition):
another worker takes over with a higher token, and the old one wakes up and writes. Locks alone
cannot stop that write; the store can, by remembering the highest token it has accepted::

    async with locks("invoice:7") as lease:
        invoice = compute()
        await fenced_set(redis_client, "invoice:7", lease.token, invoice)  # StaleToken if late

In SQL, keep a ``fence`` column and let the ``WHERE`` clause do the check (``fenced_update``)::

    UPDATE invoices SET total = :total, fence = :token WHERE id = :id AND fence < :token

Zero rows updated means a newer holder already wrote: raise, do not retry blindly.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Protocol, cast

from .errors import StaleToken

if TYPE_CHECKING:
    import contextlib

    import redis
    import redis.asyncio

__all__ = [
    "FENCED_SET",
    "fenced_get",
    "fenced_get_sync",
    "fenced_set",
    "fenced_set_sync",
    "fenced_update",
]

# KEYS[1] value key, KEYS[2] highest token accepted; ARGV[1] token, ARGV[2] value
# -> {1, token} written; {0, highest} rejected and nothing changed
FENCED_SET = """
local highest = tonumber(redis.call('GET', KEYS[2]) or '-1')
if tonumber(ARGV[1]) < highest then
  return {0, string.format('%.0f', highest)}
end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[2])
return {1, ARGV[1]}
"""


_SHA = hashlib.sha1(FENCED_SET.encode()).hexdigest()


def _keys(resource: str, prefix: str) -> list[str]:
    from .backends.redis._keys import Layout  # one hash tag: both keys in one Cluster slot

    return Layout(prefix).fenced(resource)


def _boundary(resource: str, client: object) -> contextlib.AbstractContextManager[None]:
    """Redis errors become BackendUnavailable naming the server (redis is imported only here:
    whoever calls these has a redis client already)."""
    from .backends.redis._clients import address
    from .backends.redis._wire import map_errors

    return map_errors(resource, address(client))


def _verdict(resource: str, token: int, reply: object) -> None:
    accepted, highest = cast("list[int | bytes]", reply)
    if not int(accepted):
        raise StaleToken(
            f"write to {resource!r} with token {token} rejected: token {int(highest)} already "
            "wrote there, so this lease was taken over; drop the result and reconcile",
            key=resource,
        )


def fenced_set_sync(
    client: redis.Redis,
    resource: str,
    token: int,
    value: str | bytes | int | float,
    *,
    prefix: str = "keylock:fenced",
) -> None:
    """Atomically store *value* for *resource* if *token* >= the highest token seen for it.

    Raises StaleToken, changing nothing, when a newer token already wrote.
    """
    from redis.exceptions import NoScriptError

    keys = _keys(resource, prefix)
    with _boundary(resource, client):
        try:
            reply = client.evalsha(_SHA, 2, *keys, token, value)
        except NoScriptError:
            reply = client.eval(FENCED_SET, 2, *keys, token, value)
    _verdict(resource, token, reply)


async def fenced_set(
    client: redis.asyncio.Redis,
    resource: str,
    token: int,
    value: str | bytes | int | float,
    *,
    prefix: str = "keylock:fenced",
) -> None:
    """Async twin of :func:`fenced_set_sync`."""
    from redis.exceptions import NoScriptError

    keys = _keys(resource, prefix)
    with _boundary(resource, client):
        try:
            reply = await client.evalsha(_SHA, 2, *keys, token, value)
        except NoScriptError:
            reply = await client.eval(FENCED_SET, 2, *keys, token, value)
    _verdict(resource, token, reply)


def fenced_get_sync(
    client: redis.Redis, resource: str, *, prefix: str = "keylock:fenced"
) -> tuple[bytes | None, int | None]:
    """The stored value and the highest token accepted for *resource*."""
    with _boundary(resource, client):
        value, fence = client.mget(_keys(resource, prefix))
    return cast("bytes | None", value), (int(fence) if fence is not None else None)


async def fenced_get(
    client: redis.asyncio.Redis, resource: str, *, prefix: str = "keylock:fenced"
) -> tuple[bytes | None, int | None]:
    """Async twin of :func:`fenced_get_sync`."""
    with _boundary(resource, client):
        value, fence = await client.mget(_keys(resource, prefix))
    return cast("bytes | None", value), (int(fence) if fence is not None else None)


class _Cursor(Protocol):
    rowcount: int


class _Connection(Protocol):
    def execute(self, sql: str, parameters: dict[str, object], /) -> _Cursor: ...


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def fenced_update(
    connection: _Connection,
    table: str,
    row_id: object,
    token: int,
    values: dict[str, object],
    *,
    id_column: str = "id",
    fence_column: str = "fence",
) -> None:
    """``UPDATE table SET ..., fence = :token WHERE id = :id AND fence < :token``.

    Works on any DB-API connection with the named paramstyle (sqlite3; use the same statement
    with your driver's placeholders elsewhere). Each token writes a row once; zero rows updated
    raises StaleToken (a newer holder wrote, or the row does not exist). The caller commits.
    """
    for name in (table, id_column, fence_column, *values):
        if not _IDENTIFIER.match(name):
            raise ValueError(f"{name!r} is not a plain SQL identifier")
    assignments = ", ".join(f"{column} = :v_{column}" for column in values)
    sql = (
        f"UPDATE {table} SET {assignments}, {fence_column} = :token "
        f"WHERE {id_column} = :id AND {fence_column} < :token"
    )
    parameters: dict[str, object] = {f"v_{k}": v for k, v in values.items()}
    parameters.update(token=token, id=row_id)
    cursor = connection.execute(sql, parameters)
    if cursor.rowcount == 0:
        raise StaleToken(
            f"update of {table} row {row_id!r} with token {token} rejected: a newer token "
            "already wrote it (or the row is missing); drop the result and reconcile",
            key=f"{table}:{row_id}",
        )
