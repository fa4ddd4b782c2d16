"""Incident 1, batch status promotion: three sub-jobs finish at once; each bumps its counter,
then reads the three counters and writes the batch's terminal status, awaiting between the
read and the write. Interleaved, a stale reader overwrites "failed" with "complete" although
failed=1 (the naive run below shows it). Under the batch's lock the final status always agrees
with the counters."""

from __future__ import annotations

import asyncio
import random

from keylock import KeyedLock


class Batch:
    def __init__(self) -> None:
        self.counters = {"done": 0, "failed": 0, "total": 3}
        self.status = "running"

    async def finish(self, failed: bool, rng: random.Random) -> None:
        await asyncio.sleep(rng.random() * 0.002)
        self.counters["failed" if failed else "done"] += 1
        done, bad, total = self.counters["done"], self.counters["failed"], self.counters["total"]
        await asyncio.sleep(rng.random() * 0.002)  # read -> (I/O) -> write
        if done + bad == total:
            self.status = "failed" if bad else "complete"
        else:
            self.status = "partial"


async def _trial(locks: KeyedLock | None, seed: int) -> Batch:
    rng = random.Random(seed)
    batch = Batch()

    async def sub_job(failed: bool) -> None:
        if locks is None:
            await batch.finish(failed, rng)
        else:
            async with locks("batch:1"):
                await batch.finish(failed, rng)

    await asyncio.gather(sub_job(False), sub_job(True), sub_job(False))
    return batch


def _agrees(batch: Batch) -> bool:
    return batch.status == ("failed" if batch.counters["failed"] else "complete")


async def test_naive_promotion_disagrees_with_the_counters() -> None:
    outcomes = [await _trial(None, seed) for seed in range(100)]
    assert any(not _agrees(batch) for batch in outcomes)


async def test_locked_promotion_always_agrees() -> None:
    locks = KeyedLock()
    for seed in range(100):
        batch = await _trial(locks, seed)
        assert batch.counters == {"done": 2, "failed": 1, "total": 3}
        assert batch.status == "failed", seed
