"""``keylock inspect`` and ``keylock release --force`` for Postgres permits (semaphores, RW
locks), beside locks, as the Redis inspect lists them."""

from __future__ import annotations

import threading
import time

import pytest

from keylock import KeyedLock, KeyedRWLock, KeyedSemaphore, LeaseLost
from keylock._inspect import force_release_postgres, inspect_postgres
from keylock.backends import PostgresBackend
from keylock.backends.base import RW_LIMIT
from keylock.cli import main

from .._pg_server import PgServer
from .._poll import polled


def test_inspect_lists_postgres_permit_keys_beside_locks(
    postgres_server: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each permit key with live permits: the newest holder's token and owner, the TTL of the
    permit that lapses last, (live permits, limit); the CLI shows them as on Redis. Failed
    before: inspect listed locks only."""
    postgres_server.flush()
    url = postgres_server.url
    backend = PostgresBackend.from_url(url)
    lock = KeyedLock(backend, namespace="app").acquire_sync("job")
    sem = KeyedSemaphore(backend, limit=4, namespace="app")
    permits = [sem.acquire_sync("api"), sem.acquire_sync("api")]
    reader = KeyedRWLock(backend, namespace="app").acquire_read_sync("doc")
    found = {(held.key, held.permits): held for held in inspect_postgres(url)}
    assert set(found) == {("app:job", None), ("app:api", (2, 4)), ("app:doc", (1, RW_LIMIT))}
    newest = found[("app:api", (2, 4))]
    assert newest.stored == "app\x00api"
    assert newest.token == permits[1].token
    assert newest.owner == permits[1].owner.hex()
    assert newest.ttl is not None
    assert 20 < newest.ttl <= 30
    assert newest.waiting == 0
    assert main(["inspect", "--postgres-url", url]) == 0
    out = capsys.readouterr().out
    assert "2 permits of limit 4; newest: owner" in out
    assert "1 permit of an RW lock; newest: owner" in out
    assert "3 held" in out
    for lease in (lock, *permits, reader):
        lease.release_sync()
    assert list(inspect_postgres(url)) == []
    backend.close_sync()


def test_force_release_frees_one_postgres_permit_and_grants_the_waiter_at_once(
    postgres_server: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full semaphore (limit 2) with a waiter in another process's backend (poll=30 s: only
    the NOTIFY can wake it in time): ``release --force`` breaks the newest permit only, the
    waiter is granted at once with a higher token, the other permit is still held, and the
    broken holder learns it on release. Another owner's force-release changes nothing.
    Failed before: release --force could not find a permit's holder."""
    postgres_server.flush()
    url = postgres_server.url
    holder = KeyedSemaphore(PostgresBackend.from_url(url), limit=2, namespace="app")
    waiter = KeyedSemaphore(PostgresBackend.from_url(url, poll=30.0), limit=2, namespace="app")
    first, second = holder.acquire_sync("api"), holder.acquire_sync("api")
    granted: list[int] = []

    def wait() -> None:
        got = waiter.acquire_sync("api", timeout=30)
        granted.append(got.token)
        got.release_sync()

    thread = threading.Thread(target=wait)
    thread.start()
    assert polled(lambda: [h.waiting for h in inspect_postgres(url)] == [1])
    assert not force_release_postgres(url, "app\x00api", owner=b"someone else")
    started = time.monotonic()
    assert main(["release", "app:api", "--force", "--yes", "--postgres-url", url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"token {second.token}" in out[0]
    assert out[-1] == "released"
    thread.join(30)
    assert granted
    assert granted[0] > second.token
    assert time.monotonic() - started < 5.0  # woken by the NOTIFY, not its 30 s poll
    with pytest.raises(LeaseLost):
        second.release_sync()
    assert [(h.token, h.permits) for h in inspect_postgres(url)] == [(first.token, (1, 2))]
    first.release_sync()
    holder.close_sync()
    waiter.close_sync()


def test_force_release_of_a_writer_lets_the_readers_in(postgres_server: PgServer) -> None:
    """An RW lock's writer broken by owner (as ``inspect`` showed it): the readers waiting
    behind it are granted together; a lock of the same name is untouched (its own keyspace)."""
    postgres_server.flush()
    url = postgres_server.url
    rw = KeyedRWLock(PostgresBackend.from_url(url), namespace="app")
    others = [
        KeyedRWLock(PostgresBackend.from_url(url, poll=30.0), namespace="app") for _ in range(2)
    ]
    lock = KeyedLock(PostgresBackend.from_url(url), namespace="app")
    plain = lock.acquire_sync("doc")
    writer = rw.acquire_write_sync("doc")
    readers: list[int] = []

    def read(other: KeyedRWLock) -> None:
        got = other.acquire_read_sync("doc", timeout=30)
        readers.append(got.token)
        got.release_sync()

    threads = [threading.Thread(target=read, args=(other,)) for other in others]
    for thread in threads:
        thread.start()
    assert polled(
        lambda: [h.waiting for h in inspect_postgres(url) if h.permits is not None] == [2]
    )
    shown = next(h for h in inspect_postgres(url) if h.permits is not None)
    assert shown.owner == writer.owner.hex()
    started = time.monotonic()
    assert force_release_postgres(url, "app\x00doc", owner=shown.owner)
    for thread in threads:
        thread.join(30)
    assert len(readers) == 2
    assert min(readers) > writer.token
    assert time.monotonic() - started < 5.0  # both woken by the NOTIFY, not their 30 s poll
    with pytest.raises(LeaseLost):
        writer.release_sync()
    assert [h.token for h in inspect_postgres(url)] == [plain.token]
    plain.release_sync()
    for locks in (rw, *others, lock):
        locks.close_sync()
