"""Connections finishes a cancelled caller's release at the loop's end, whatever else runs."""

from __future__ import annotations

import asyncio

import fakeredis

from keylock.backends.redis._connections import Connections


async def test_closing_a_loop_survives_releases_finishing_meanwhile() -> None:
    """The loop's end re-runs every unfinished release while the first runs still go on in
    the background; one of those finishing then drops itself from the table being walked.
    That walk raised ``RuntimeError: dictionary changed size during iteration`` (checked on
    the old code) and left the other releases and the loop's connections unclosed."""
    connections = Connections(fakeredis.FakeRedis(), None)
    runs: list[int] = []

    def call(number: int, steps: int) -> object:
        async def run() -> None:
            for _ in range(steps):
                await asyncio.sleep(0)
            runs.append(number)

        return run

    connections.finish(call(1, steps=10))  # its re-run lets the background run of 2 finish
    connections.finish(call(2, steps=2))
    connections.finish(call(3, steps=50))
    await connections._close_loop(asyncio.get_running_loop())
    assert connections._unfinished == {}
    for _ in range(100):  # the background runs end within a few loop turns
        if len(runs) >= 5:
            break
        await asyncio.sleep(0)
    # 1 and 3 ran twice (background and loop end), 2 once: finished before the walk reached it
    assert sorted(runs) == [1, 1, 2, 3, 3], runs
