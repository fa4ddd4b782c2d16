"""Bounded polls of a condition, for tests: a test waits for what it needs, at most a set
time, never with a sleep that "should be long enough" (a loaded 2-core host is slow)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["polled", "until"]


def polled(condition: Callable[[], object], timeout: float = 10.0) -> bool:
    """Whether *condition()* became true within *timeout* seconds (looked at every 1-10 ms)."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    return True


def until(condition: Callable[[], object], what: str, within: float = 30.0) -> None:
    """Wait until *condition()* is true; AssertionError naming *what* after *within* s."""
    if not polled(condition, within):
        raise AssertionError(f"never within {within} s: {what}")
