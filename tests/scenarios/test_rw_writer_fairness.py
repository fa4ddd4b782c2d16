"""A writer behind a continuous stream of readers (issue 12): it gets the key as soon as the
readers that arrived before it finish, within one reader hold time, however many readers keep
arriving after it.

Judged by event order, not by timing: readers hold until the test lets them go; a new reader
arrives while the previous one still holds (a stream that never leaves the key unread). The
figure is how many readers that arrived after the writer were granted before it: 0 for a fair
(FIFO across modes) lock. The planted reader-preferring lock below (a reader is let in
whenever no writer holds, whoever waits) fails it: the writer waits out the whole stream.
"""

from __future__ import annotations

import asyncio
import time

from keylock import KeyedRWLock, Lease
from keylock.backends import Backend, MemoryBackend
from keylock.backends._permits import MemoryPermits, permit_view
from keylock.backends._permittable import _LIMIT, _USED
from keylock.backends.base import Grant, Waiter

from ..conftest import MakeBackend

BEFORE = 3  # readers holding when the writer arrives
AFTER = 6  # readers arriving after it, one while the previous holds


async def _until(condition: object, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within}s")
        await asyncio.sleep(0.001)


async def _readers_granted_before_the_writer(rw: KeyedRWLock) -> int:
    """Run the stream; return how many readers that arrived after the writer got the key
    before it."""
    granted: list[str] = []
    release = {name: asyncio.Event() for name in [f"r{i}" for i in range(BEFORE + AFTER)]}

    async def reader(name: str) -> None:
        lease = await rw.acquire_read("doc", timeout=30)
        granted.append(name)
        await release[name].wait()
        await lease.release()

    async def writer() -> None:
        lease: Lease = await rw.acquire_write("doc", timeout=30)
        granted.append("W")
        await lease.release()

    tasks = [asyncio.create_task(reader(f"r{i}")) for i in range(BEFORE)]
    await _until(lambda: len(granted) == BEFORE, "the first readers' grants")
    tasks.append(asyncio.create_task(writer()))
    await _until(lambda: rw.statistics("doc").waiting == 1, "the writer queueing")
    for i in range(BEFORE, BEFORE + AFTER):
        name = f"r{i}"
        tasks.append(asyncio.create_task(reader(name)))
        started = i + 2  # readers so far and the writer
        # bounded poll: the new reader is in, or queued (behind the writer)
        await _until(
            lambda name=name, started=started: (
                name in granted or rw.statistics("doc").waiting == started - len(granted)
            ),
            f"{name} arriving",
        )
        if i == BEFORE:  # the readers who arrived before the writer finish now
            for j in range(BEFORE):
                release[f"r{j}"].set()
        elif f"r{i - 1}" in granted:  # the stream goes on: the previous one leaves
            release[f"r{i - 1}"].set()
        await asyncio.sleep(0)
    for event in release.values():  # the stream ends
        event.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    late = [f"r{i}" for i in range(BEFORE, BEFORE + AFTER)]
    return sum(1 for name in granted[: granted.index("W")] if name in late)


async def test_a_writer_is_not_starved_by_a_stream_of_readers(
    make_permit_client: MakeBackend,
) -> None:
    rw = KeyedRWLock(make_permit_client())
    assert await _readers_granted_before_the_writer(rw) == 0


class _ReaderPreferring(MemoryPermits):
    """Planted: a reader is let in whenever it fits next to the holders, even past a waiting
    writer (the reader-preferring RW lock of many textbooks)."""

    def _try_acquire(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        waiter: Waiter | None,
        holder: object = None,
    ) -> Grant | None:
        table = self.table
        with table.mutex:
            entry = table.keys.get(key)
            if entry is not None and entry[_USED] + 1 <= entry[_LIMIT]:
                if waiter is not None:
                    if waiter.grant is not None:
                        return waiter.grant
                    if entry[3]:  # (its place in the line, if it had one)
                        entry[3].pop(waiter, None)
                return table._grant(entry, owner, ttl, 1, None)
        return super()._try_acquire(key, owner, ttl, waiter, holder)  # type: ignore[arg-type]


class _PlantedBackend(MemoryBackend):
    def permits(self, limit: int, weight: int = 1) -> Backend:
        cls = _ReaderPreferring if weight == 1 else MemoryPermits
        return permit_view(self, limit, weight, self.clock, cls)


async def test_the_planted_reader_preferring_lock_starves_the_writer() -> None:
    """The scenario has teeth: a reader-preferring lock lets every later reader in first."""
    rw = KeyedRWLock(_PlantedBackend())
    assert await _readers_granted_before_the_writer(rw) == AFTER
