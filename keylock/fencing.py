"""Storage-side fencing: the store rejects a writer whose lease token is older than one it saw.

A lease can be lost without its holder noticing in time (a GC pause, SIGSTOP, a partition):
another worker takes over with a higher token, and the old one wakes up and writes. Locks alone
cannot stop that write; the store can, by remembering the highest token it has accepted::

    async with locks("invoice:7") as lease:
        invoice = compute()
        await fenced_set(redis_client, "invoice:7", lease.token, invoice)  # StaleToken if late

In SQL, keep a ``fence`` column (``NOT NULL DEFAULT 0``) and let the ``WHERE`` clause do the
check (``fenced_update``; extra compare conditions join it with ``AND``)::

    UPDATE invoices SET total = :total, fence = :token WHERE id = :id AND fence <= :token

Zero rows updated means a newer holder already wrote: raise, do not retry blindly. A holder may
write again with its own token (``<=``), never with an older one.

Tokens are integers in ``[0, 2**63)`` (every backend's tokens are; SQL's BIGINT holds them).
Anything else (``bool``, a float, ``NaN``, a string, a negative number) raises ``TypeError`` or
``ValueError`` before any I/O. On Redis a token travels as its decimal string and the script
compares the digits exactly (no floating point); a stored fence that is not such a string (a
poisoned or hand-edited key) makes every write fail with :class:`~keylock.StaleToken` until it is
repaired, so it can never let a stale write through.
"""

from __future__ import annotations

import hashlib
import inspect
import operator
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

MAX_TOKEN = 2**63 - 1  # the largest token a fence accepts (a signed 64-bit integer)

# KEYS[1] value key, KEYS[2] highest token accepted; ARGV[1] token (canonical decimal: checked
# by the caller), ARGV[2] value
# -> {1, token} written; {0, highest} older token; {2, stored} the stored fence is not a
# canonical decimal. Nothing changes unless 1. Digits are compared as strings (length, then
# byte by byte): exact for any size, where tonumber() would round above 2^53.
FENCED_SET = """
local stored = redis.call('GET', KEYS[2])
local token = ARGV[1]
if stored then
  if stored ~= '0' and not string.match(stored, '^[1-9]%d*$') then
    return {2, stored}
  end
  if #token < #stored then
    return {0, stored}
  end
  if #token == #stored then
    for i = 1, #token do
      local a, b = string.byte(token, i), string.byte(stored, i)
      if a ~= b then
        if a < b then
          return {0, stored}
        end
        break
      end
    end
  end
end
redis.call('SET', KEYS[2], token)
redis.call('SET', KEYS[1], ARGV[2])
return {1, token}
"""


_SHA = hashlib.sha1(FENCED_SET.encode()).hexdigest()


def _check_token(resource: object, token: object) -> int:
    """*token* as an ``int`` in ``[0, MAX_TOKEN]``; TypeError/ValueError naming *resource*."""
    if isinstance(token, bool):
        raise TypeError(
            f"fencing token for {resource!r} must be an int (lease.token), not a bool: {token!r}"
        )
    try:
        value = operator.index(token)  # type: ignore[arg-type]  # int, numpy ints; not float
    except TypeError:
        if isinstance(getattr(token, "token", None), int):  # the lease (or its block) itself
            raise TypeError(
                f"fencing token for {resource!r} must be an int, not the lease {token!r}: "
                "pass lease.token"
            ) from None
        raise TypeError(
            f"fencing token for {resource!r} must be an int (lease.token), not "
            f"{type(token).__name__} {token!r}: pass the lease's token unchanged (a float or "
            "a string cannot be compared exactly)"
        ) from None
    if not 0 <= value <= MAX_TOKEN:
        raise ValueError(
            f"fencing token for {resource!r} must be in [0, 2**63), not {value}: pass the "
            "lease's token unchanged"
        )
    return value


_Value = str | bytes | int | float


def _check_set(resource: object, token: object, value: object) -> str:
    """The token's canonical decimal string, after checking every argument."""
    if not isinstance(resource, str):
        raise TypeError(f"fenced resource must be a str, not {type(resource).__name__}")
    checked = _check_token(resource, token)
    if isinstance(value, bool) or not isinstance(value, str | bytes | int | float):
        raise TypeError(
            f"value for {resource!r} must be str, bytes, int or float, not "
            f"{type(value).__name__}: encode it first (e.g. json.dumps)"
        )
    return str(checked)


def _keys(resource: str, prefix: str) -> list[str]:
    from .backends.redis._keys import Layout  # one hash tag: both keys in one Cluster slot

    return Layout(prefix).fenced(resource)


def _boundary(
    resource: str, client: object, call: str, *, awaited: bool
) -> contextlib.AbstractContextManager[None]:
    """Redis errors become BackendUnavailable naming the server (redis is imported only here:
    whoever calls these has a redis client already). A client of the other flavour than
    *call* (an asyncio one given to a ``_sync`` twin, or the reverse) is a TypeError before
    any I/O: it would write, then fail on the reply, telling the caller nothing was written."""
    from .backends.redis._clients import address
    from .backends.redis._wire import map_errors

    execute = getattr(client, "execute_command", None)
    if execute is not None and inspect.iscoroutinefunction(execute) is not awaited:
        twin = call.removesuffix("_sync") if call.endswith("_sync") else f"{call}_sync"
        kind = "an asyncio client" if not awaited else "a sync client"
        raise TypeError(
            f"{call}({resource!r}, ...) got {type(client).__name__}, {kind}: call {twin} with "
            f"it, or give {call} a {'redis.asyncio' if awaited else 'redis'}.Redis "
            "(nothing was sent)"
        )
    return map_errors(resource, address(client))


def _verdict(resource: str, token: int, reply: object) -> None:
    status, highest = cast("list[int | bytes]", reply)
    if int(status) == 1:
        return
    if int(status) == 2:
        raise StaleToken(
            f"write to {resource!r} with token {token} refused: the stored fence is not a "
            f"token ({_shown(highest)}), so no write can be checked; nothing changed. Reconcile, "
            "then delete the fence key (fenced_get shows it) or set it to the highest token used",
            key=resource,
        )
    raise StaleToken(
        f"write to {resource!r} with token {token} rejected: token {_shown(highest)} already "
        "wrote there, so this lease was taken over; drop the result and reconcile",
        key=resource,
    )


def _shown(stored: int | bytes) -> str:
    text = stored.decode("ascii", "replace") if isinstance(stored, bytes) else str(stored)
    return text if len(text) <= 40 else text[:40] + "..."


_CANONICAL = re.compile(r"0|[1-9][0-9]*")


def _fence(resource: str, stored: object) -> int | None:
    if stored is None:
        return None
    text = stored.decode("ascii", "replace") if isinstance(stored, bytes) else str(stored)
    if _CANONICAL.fullmatch(text):  # what the script accepts: the same digits, no sign, no 0-pad
        return int(text)
    raise ValueError(
        f"the stored fence of {resource!r} is not a token ({_shown(text.encode())}): every "
        "fenced write to it is refused until it is repaired; reconcile, then delete the fence key"
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

    Raises StaleToken, changing nothing, when a newer token already wrote (or the stored fence
    is corrupt); TypeError/ValueError, before any I/O, for a token that is not an int in
    ``[0, 2**63)`` or a value Redis cannot store.
    """
    from redis.exceptions import NoScriptError

    digits = _check_set(resource, token, value)
    keys = _keys(resource, prefix)
    with _boundary(resource, client, "fenced_set_sync", awaited=False):
        try:
            reply = client.evalsha(_SHA, 2, *keys, digits, value)
        except NoScriptError:
            reply = client.eval(FENCED_SET, 2, *keys, digits, value)
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

    digits = _check_set(resource, token, value)
    keys = _keys(resource, prefix)
    with _boundary(resource, client, "fenced_set", awaited=True):
        try:
            reply = await client.evalsha(_SHA, 2, *keys, digits, value)
        except NoScriptError:
            reply = await client.eval(FENCED_SET, 2, *keys, digits, value)
    _verdict(resource, token, reply)


def fenced_get_sync(
    client: redis.Redis, resource: str, *, prefix: str = "keylock:fenced"
) -> tuple[bytes | None, int | None]:
    """The stored value and the highest token accepted for *resource* (ValueError if the
    stored fence is not a token)."""
    with _boundary(resource, client, "fenced_get_sync", awaited=False):
        value, fence = client.mget(_keys(resource, prefix))
    return cast("bytes | None", value), _fence(resource, fence)


async def fenced_get(
    client: redis.asyncio.Redis, resource: str, *, prefix: str = "keylock:fenced"
) -> tuple[bytes | None, int | None]:
    """Async twin of :func:`fenced_get_sync`."""
    with _boundary(resource, client, "fenced_get", awaited=True):
        value, fence = await client.mget(_keys(resource, prefix))
    return cast("bytes | None", value), _fence(resource, fence)


class _Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> tuple[object, ...] | None: ...


class _Connection(Protocol):
    def execute(self, sql: str, parameters: dict[str, object], /) -> _Cursor: ...


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?\Z")


def _identifier(name: object, what: str, pattern: re.Pattern[str] = _IDENTIFIER) -> str:
    if not isinstance(name, str):
        raise TypeError(f"fenced_update: {what} must be a str, not {type(name).__name__}")
    if not pattern.match(name):
        raise ValueError(
            f"fenced_update: {what} {name!r} is not a plain SQL identifier (letters, digits, "
            "underscores; names are put into the statement, so nothing else is accepted)"
        )
    return name


_NAMED = re.compile(r":([A-Za-z_][A-Za-z0-9_]*)")


def _execute(connection: _Connection, sql: str, parameters: dict[str, object]) -> _Cursor:
    """Run *sql* (named ``:name`` placeholders) in the driver's own style: psycopg (3) takes
    ``%(name)s``, so a Postgres fence check runs in the caller's psycopg transaction."""
    if type(connection).__module__.startswith("psycopg"):
        sql = _NAMED.sub(r"%(\1)s", sql)  # names are checked identifiers: no '%' to escape
    return connection.execute(sql, parameters)


def fenced_update(
    connection: _Connection,
    table: str,
    row_id: object,
    token: int,
    values: dict[str, object],
    *,
    where: dict[str, object] | None = None,
    id_column: str = "id",
    fence_column: str = "fence",
) -> bool:
    """``UPDATE table SET ..., fence = :token WHERE id = :id AND fence <= :token [AND ...]``.

    Works on any DB-API connection with the named paramstyle (sqlite3) and on a psycopg 3
    connection (Postgres: the same database as :class:`~keylock.backends.PostgresBackend`);
    elsewhere use the same statement with your driver's placeholders. The caller commits: inside
    ``with conn.transaction():`` the check and the write are one commit with the rest. The
    holder may write again with its own token; an older token raises StaleToken (a newer
    holder wrote), as does a missing row. *where* adds equality conditions
    (``{"status": "RUNNING"}``): a compare-and-set. Returns True when the row was written,
    False when the fence passed but a *where* condition did not match (nothing changed;
    without *where*, never False).

    Checked before any SQL runs (TypeError/ValueError): the token (an int in ``[0, 2**63)``),
    non-empty *values*, plain identifiers for every name (no SQL through names), no
    assignment to the fence or the id column, no ``None`` in *where* (``= NULL`` never
    matches). Start the fence column at 0: a NULL fence raises ValueError.
    """
    resource = f"{table}:{row_id}"
    token = _check_token(resource, token)
    _identifier(table, "table", _TABLE)
    _identifier(id_column, "id_column")
    _identifier(fence_column, "fence_column")
    if not isinstance(values, dict) or not values:
        raise ValueError(
            f"fenced_update of {resource!r}: values must be a non-empty dict of column -> value"
        )
    conditions = {} if where is None else where
    if not isinstance(conditions, dict):
        raise TypeError(f"fenced_update of {resource!r}: where must be a dict of column -> value")
    for column in values:
        _identifier(column, "column")
        if column in (fence_column, id_column):
            raise ValueError(
                f"fenced_update of {resource!r}: values may not set {column!r}: the fence is "
                "set to the token, and the row is found by its id"
            )
    for column, expected in conditions.items():
        _identifier(column, "where column")
        if expected is None:
            raise ValueError(
                f"fenced_update of {resource!r}: where[{column!r}] is None, which never "
                "matches in SQL (= NULL); compare with a value"
            )
    assignments = ", ".join(f"{column} = :v_{column}" for column in values)
    checks = "".join(f" AND {column} = :w_{column}" for column in conditions)
    sql = (
        f"UPDATE {table} SET {assignments}, {fence_column} = :token "
        f"WHERE {id_column} = :id AND {fence_column} <= :token{checks}"
    )
    parameters: dict[str, object] = {f"v_{k}": v for k, v in values.items()}
    parameters.update({f"w_{k}": v for k, v in conditions.items()})
    parameters.update(token=token, id=row_id)
    if _execute(connection, sql, parameters).rowcount > 0:
        return True
    # Why nothing matched. Fences only grow, so a fence above the token now was above it at
    # the UPDATE, and one at or below it now was too: only *where* can have failed then.
    check = f"SELECT {fence_column} FROM {table} WHERE {id_column} = :id"
    row = _execute(connection, check, {"id": row_id}).fetchone()
    if row is None:
        raise StaleToken(
            f"update of {table} row {row_id!r} with token {token} found no such row; "
            "nothing changed",
            key=resource,
        )
    fence = row[0]
    if fence is None:
        raise ValueError(
            f"update of {table} row {row_id!r}: its {fence_column} is NULL, which no token "
            f"passes; give the column NOT NULL DEFAULT 0"
        )
    try:
        newer = int(cast("int", fence)) > token
    except (TypeError, ValueError):
        raise ValueError(
            f"update of {table} row {row_id!r}: its {fence_column} holds {fence!r}, not a "
            "token; store tokens in an integer column"
        ) from None
    if newer:
        raise StaleToken(
            f"update of {table} row {row_id!r} with token {token} rejected: token {fence} "
            "already wrote it, so this lease was taken over; drop the result and reconcile",
            key=resource,
        )
    return False
