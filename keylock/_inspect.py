"""``keylock inspect`` and ``keylock release --force``: what is held, by whom, until when."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psycopg
    import redis

    from .backends.redis._keys import Layout

__all__ = [
    "HeldLock",
    "force_release_postgres",
    "force_release_redis",
    "inspect_directory",
    "inspect_postgres",
    "inspect_redis",
    "missing_postgres_table",
]


def shown(stored: str) -> str:
    """A stored key as people write it: ``namespace:key`` (stored with NUL between the two)."""
    return stored.replace("\x00", ":")


@dataclass(frozen=True)
class HeldLock:
    """One lock as the store shows it."""

    key: str
    token: int | None
    owner: str | None  # hex
    ttl: float | None  # seconds left; None = no expiry
    waiting: int
    holder_pid: int | None = None
    holder_host: str | None = None
    stored: str = ""  # the key exactly as stored ("namespace NUL key"): what release needs
    permits: tuple[int, int] | None = None  # a permit key: (live permits, its limit)
    # a permit key of a lock directory: each holder (permit, token, pid, owner hex)
    holders: tuple[tuple[str, int | None, int | None, str | None], ...] = ()


def inspect_redis(url: str, *, prefix: str = "keylock") -> Iterator[HeldLock]:
    """Every lock currently held on the server at *url* (walks the keyspace with SCAN)."""
    import redis

    from .backends.redis._keys import Layout

    layout = Layout(prefix)
    client = redis.Redis.from_url(url)
    try:
        for raw in client.scan_iter(match=layout.scan_pattern(), count=500):
            name = raw.decode("utf-8", "surrogatepass")
            key = layout.parse(name)
            if key is None:  # :fence, :queue, :alive companions
                continue
            lock, fence, queue = layout.lock(key)[:3]
            pipe = client.pipeline(transaction=False)
            pipe.get(lock)
            pipe.pttl(lock)
            pipe.get(fence)
            pipe.zcard(queue)
            owner, pttl, token, waiting = pipe.execute()
            if owner is None:
                continue  # released between SCAN and GET
            yield HeldLock(
                key=shown(key),
                stored=key,
                token=int(token) if token is not None else None,
                owner=bytes(owner).hex(),
                ttl=None if pttl is None or pttl < 0 else pttl / 1000,
                waiting=int(waiting),
            )
        yield from _redis_permits(client, layout)
    finally:
        client.close()


def _redis_permits(client: redis.Redis, layout: Layout) -> Iterator[HeldLock]:
    """Every permit key with live permits (semaphores, RW locks): the newest holder's token
    and owner, the TTL of the permit that lapses last, how many wait, (permits, limit)."""
    from .backends.redis._permit_scripts import PERMIT_STATS

    for raw in client.scan_iter(match=layout.permit_scan_pattern(), count=500):
        key = layout.parse_permit(raw.decode("utf-8", "surrogatepass"))
        if key is None:
            continue
        keys = layout.permit(key, b"")[:4]
        live, token, owner, waiting, limit, ttl_ms = client.eval(PERMIT_STATS.text, 4, *keys)
        if not live:
            continue  # released (or lapsed) between SCAN and the look
        ttl = int(ttl_ms) / 1000
        yield HeldLock(
            key=shown(key),
            stored=key,
            token=int(token),
            owner=bytes(owner).hex(),
            ttl=max(ttl, 0.0),
            waiting=int(waiting),
            permits=(int(live), int(limit)),
        )


def force_release_redis(
    url: str, key: str, *, prefix: str = "keylock", owner: bytes | str | None = None
) -> bool:
    """Free *key*'s lock, or its permit, if *owner* (bytes or hex; None: whoever holds the lock
    now, else the newest permit) still holds it, and hand it to the next waiter at once; True
    if a live lease was broken."""
    import redis

    from .backends.redis import force_release

    client = redis.Redis.from_url(url)
    try:
        return force_release(client, key, owner=owner, prefix=prefix)
    finally:
        client.close()


def _postgres(url: str) -> psycopg.Connection[tuple[object, ...]]:
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def inspect_postgres(url: str, *, table: str = "keylock_leases") -> Iterator[HeldLock]:
    """Every lock currently held in the Postgres table *table* of the database at *url*, then
    every permit key (semaphores, RW locks) with live permits."""
    from .backends.postgres._admin import held, permits_held

    with _postgres(url) as conn:
        rows = held(conn, table=table)
        permit_rows = permits_held(conn, table=table)
    for key, owner, token, left, waiting in rows:
        name = key.decode("utf-8", "surrogatepass")
        yield HeldLock(
            key=shown(name),
            stored=name,
            token=token,
            owner=owner.hex(),
            ttl=max(left, 0.0),
            waiting=waiting,
        )
    # permit keys (semaphores, RW locks), as on Redis: the newest holder, the TTL of the permit
    # that lapses last, (live permits, limit)
    for key, owner, token, left, waiting, live, limit in permit_rows:
        name = key.decode("utf-8", "surrogatepass")
        yield HeldLock(
            key=shown(name),
            stored=name,
            token=token,
            owner=owner.hex(),
            ttl=max(left, 0.0),
            waiting=waiting,
            permits=(live, limit),
        )


def missing_postgres_table(url: str, *, table: str = "keylock_leases") -> tuple[str, str] | None:
    """``(schema, name)`` of *table* when neither it nor its permit table exists in the
    database at *url* (nothing has used it yet, or the name is misspelt); None when one does.
    An unqualified name is looked up as the backend's statements do, in the search path."""
    schema, _, name = table.rpartition(".")
    with _postgres(url) as conn:
        row = conn.execute(
            "SELECT to_regclass(%s) IS NULL AND to_regclass(%s) IS NULL, current_schema()",
            (table, f"{table}_permits"),
        ).fetchone()
    if row is None or not row[0]:
        return None
    return (schema or str(row[1]), name)


def force_release_postgres(
    url: str, key: str, *, table: str = "keylock_leases", owner: bytes | str | None = None
) -> bool:
    """Free *key*'s lock, or its permit, if *owner* (None: whoever holds the lock now, else the
    newest permit) still holds it, and hand it to the next waiter at once; True if a live
    lease was broken."""
    from .backends.postgres import force_release

    with _postgres(url) as conn:
        return force_release(conn, key, owner=owner, table=table)


def inspect_directory(directory: str) -> Iterator[HeldLock]:
    """Every lock file in *directory* whose OS lock some process holds now, with its key;
    then every permit key there with permits held."""
    import portalocker

    from .backends._filepaths import open_plain
    from .backends._filerecord import read_record

    flags = portalocker.LockFlags.SHARED | portalocker.LockFlags.NON_BLOCKING
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for entry in sorted(os.scandir(dir_fd), key=lambda e: e.name):
            if not entry.name.endswith(".lock") or not entry.is_file(follow_symlinks=False):
                continue
            fd = open_plain(dir_fd, entry.name)
            if fd is None:
                continue
            try:
                try:
                    portalocker.lock(fd, flags)
                except portalocker.AlreadyLocked:
                    record = read_record(fd)
                    yield HeldLock(
                        key=entry.name if record.key is None else shown(record.key),
                        stored=record.key or "",
                        token=record.token,
                        owner=None if record.owner is None else record.owner.hex(),
                        ttl=None
                        if record.expires_at is None
                        else max(record.expires_at - time.time(), 0.0),
                        waiting=0,
                        holder_pid=record.pid,
                    )
                else:
                    portalocker.unlock(fd)
            finally:
                os.close(fd)
        yield from _directory_permits(dir_fd)
    finally:
        os.close(dir_fd)


def _directory_permits(dir_fd: int) -> Iterator[HeldLock]:
    """Every permit key of the directory with permits held (semaphores, RW locks): each
    holder, the newest one's token, owner and pid, how many wait, (permits, limit)."""
    from .backends._filescan import permit_keys

    for found in permit_keys(dir_fd):
        newest = max(found.holders, key=lambda h: h.token or 0)
        yield HeldLock(
            key=found.name if found.stored is None else shown(found.stored),
            stored=found.stored or "",
            token=newest.token,
            owner=newest.owner,
            ttl=None,  # (a lease's TTL lives in its process: the file holds until it ends)
            waiting=found.waiting,
            holder_pid=newest.pid,
            permits=(found.live, found.limit or 0),
            holders=tuple(found.holders),
        )
