"""The clock every expiry is judged by: a Protocol, so tests can step time by hand."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


class Clock(Protocol):
    """Two readings: ``monotonic()`` decides expiry; ``time()`` only dates it for display."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    """The process's clocks (``time.monotonic`` and ``time.time``)."""

    __slots__ = ()
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


SYSTEM_CLOCK: Clock = SystemClock()
