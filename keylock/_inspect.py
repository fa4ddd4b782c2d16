"""``keylock inspect`` and ``keylock release --force``: what is held, by whom, until when."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["HeldLock", "force_release_redis", "inspect_directory", "inspect_redis"]


@dataclass(frozen=True)
class HeldLock:
    """One lock as the store shows it."""

    key: str
    token: int | None
    owner: str | None  # hex
    ttl: float | None  # seconds left; None = no expiry
    waiting: int
    holder_pid: int | None = None


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
            lock, fence, queue, _ = layout.lock(key)
            pipe = client.pipeline(transaction=False)
            pipe.get(lock)
            pipe.pttl(lock)
            pipe.get(fence)
            pipe.zcard(queue)
            owner, pttl, token, waiting = pipe.execute()
            if owner is None:
                continue  # released between SCAN and GET
            yield HeldLock(
                key=key,
                token=int(token) if token is not None else None,
                owner=bytes(owner).hex(),
                ttl=None if pttl is None or pttl < 0 else pttl / 1000,
                waiting=int(waiting),
            )
    finally:
        client.close()


def force_release_redis(
    url: str, key: str, *, prefix: str = "keylock", owner: bytes | str | None = None
) -> bool:
    """Delete *key*'s lock if *owner* (bytes or hex; None: whoever holds it now) still holds
    it, and hand it to the next waiter at once; True if it was deleted."""
    import redis

    from .backends.redis import force_release

    client = redis.Redis.from_url(url)
    try:
        return force_release(client, key, owner=owner, prefix=prefix)
    finally:
        client.close()


def inspect_directory(directory: str) -> Iterator[HeldLock]:
    """Every lock file in *directory* whose OS lock some process holds now."""
    import portalocker

    flags = portalocker.LockFlags.SHARED | portalocker.LockFlags.NON_BLOCKING
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if not entry.name.endswith(".lock") or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                portalocker.lock(fd, flags)
            except portalocker.AlreadyLocked:
                fields = os.pread(fd, 128, 0).split()
                token = int(fields[0]) if fields and fields[0].isdigit() else None
                pid = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
                expires = float(fields[2]) if len(fields) > 2 and fields[2] != b"-" else None
                yield HeldLock(
                    key=entry.name,
                    token=token,
                    owner=fields[3].decode() if len(fields) > 3 else None,
                    ttl=None if expires is None else max(expires - time.time(), 0.0),
                    waiting=0,
                    holder_pid=pid,
                )
            else:
                portalocker.unlock(fd)
        finally:
            os.close(fd)
