"""Progress of a benchmark run on stderr: on a terminal a bar naming the current workload with
an ETA (tqdm), elsewhere (a log, CI, a pipe) one plain line per workload.

The bar counts estimated seconds, not workloads: each step is weighted by what it is expected
to take, so the ETA holds even though a hot-key run over processes lasts a hundred times longer
than an uncontended one; tqdm's rate then corrects the estimates by what this machine does.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["Progress", "Step", "run_steps"]


class _Bar(Protocol):
    """What is used of a ``tqdm`` bar."""

    def set_description_str(self, desc: str, refresh: bool = True) -> None: ...

    n: float

    def refresh(self) -> None: ...
    def write(self, s: str, file: TextIO | None = None) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Step:
    """One workload of a run: its label, the seconds it is expected to take, and the call."""

    label: str
    estimate: float
    run: Callable[[], object]


class Progress:
    """Where a run reports: :meth:`start`/:meth:`finish` per step, :meth:`note` for a line the
    user must see (a peer skipped), :meth:`detail` for a figure (shown beside a bar only)."""

    def __init__(self, total: float, steps: int, *, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._total = total
        self._steps = steps
        self._done = 0.0
        self._index = 0
        self._started = time.monotonic()
        self._step_started = self._started
        self._step_estimate = 0.0
        self._bar = self._make_bar() if self._stream.isatty() else None
        self._stop = threading.Event()
        if self._bar is not None:  # a step lasts up to a minute: the bar moves meanwhile
            threading.Thread(target=self._tick, name="keylock-bench-progress", daemon=True).start()

    def _make_bar(self) -> _Bar | None:
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        bar: _Bar = tqdm(
            total=round(self._total, 1),
            file=self._stream,
            bar_format="{percentage:3.0f}%|{bar:20}| {elapsed}<{remaining} {desc}",
            dynamic_ncols=True,
            leave=False,
        )
        return bar

    def start(self, label: str, estimate: float = 0.0) -> None:
        self._index += 1
        self._step_started = time.monotonic()
        self._step_estimate = estimate
        if self._bar is not None:
            self._bar.set_description_str(f"[{self._index}/{self._steps}] {label}", refresh=True)
            return
        elapsed = time.monotonic() - self._started
        left = self._remaining(elapsed)
        eta = f", about {_duration(left)} left" if left is not None else ""
        self._line(f"[{self._index}/{self._steps}] {label} ({_duration(elapsed)} in{eta})")

    def finish(self, estimate: float) -> None:
        self._done += estimate
        self._step_estimate = 0.0
        self._draw()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._draw()

    def _draw(self) -> None:
        """The bar at the steps done plus the running step's time so far (short of its
        estimate, so a step that overruns waits at the end of its share)."""
        bar = self._bar
        if bar is not None:
            running = min(time.monotonic() - self._step_started, 0.95 * self._step_estimate)
            bar.n = round(self._done + max(running, 0.0), 1)
            bar.refresh()

    def note(self, message: str) -> None:
        self._line(f"  {message}")

    def detail(self, message: str) -> None:
        if self._bar is not None:
            self._line(f"  {message}")

    def close(self) -> None:
        self._stop.set()
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()

    def _remaining(self, elapsed: float) -> float | None:
        """Seconds left: the estimates still to run, scaled by how this machine compares."""
        if not self._done:
            return self._total
        return (self._total - self._done) * elapsed / self._done

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def run_steps(steps: Sequence[Step], progress: Progress) -> None:
    """Run *steps* in order, reporting each to *progress* (closed at the end, even on Ctrl-C)."""
    try:
        for step in steps:
            progress.start(step.label, step.estimate)
            step.run()
            progress.finish(step.estimate)
    finally:
        progress.close()
