"""``keylock inspect`` and ``keylock release --force``: what is held, by whom, until when."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

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
    holder_host: str | None = None


def inspect_redis(url: str, *, prefix: str = "keylock") -> Iterator[HeldLock]:
    """Every lock currently held on the server at *url* (walks the keyspace with SCAN)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for raw in client.scan_iter(match=f"{prefix}:{{*}}", count=500):
            name = raw.decode("utf-8", "surrogatepass")
            if not name.endswith("}"):  # :fence, :queue, :alive companions
                continue
            pipe = client.pipeline(transaction=False)
            pipe.get(name)
            pipe.pttl(name)
            pipe.get(f"{name}:fence")
            pipe.zcard(f"{name}:queue")
            owner, pttl, token, waiting = pipe.execute()
            if owner is None:
                continue  # released between SCAN and GET
            yield HeldLock(
                key=name[len(prefix) + 2 : -1].replace("\x00", ":"),  # namespace:key
                token=int(token) if token is not None else None,
                owner=bytes(owner).hex(),
                ttl=None if pttl is None or pttl < 0 else pttl / 1000,
                waiting=int(waiting),
            )
    finally:
        client.close()


def force_release_redis(
    url: str, key: str, *, prefix: str = "keylock", owner: bytes | None = None
) -> bool:
    """Delete *key*'s lock and wake its waiters; True if it was held. *owner* names the holder
    the operator was shown (the CLI always passes it)."""
    import redis

    from .backends.redis import _tag

    client = redis.Redis.from_url(url)
    try:
        name = f"{prefix}:{{{_tag(key)}}}"
        head = cast("list[bytes]", client.zrange(f"{name}:queue", 0, 0))
        released = bool(client.delete(name))
        client.publish(f"{prefix}:released", key.encode() + b"\0" + (head[0] if head else b""))
        return released
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
