"""Timing helpers: repeated runs -> median and spread; rows rendered as a markdown table."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Row", "Suite", "machine", "measure", "render"]


@dataclass
class Row:
    """One figure: the median of repeated runs, with its spread, and the peer it is compared to."""

    workload: str
    subject: str
    unit: str
    median: float
    low: float
    high: float
    runs: int
    higher_is_better: bool = False
    baseline: str | None = None  # subject of the same workload to divide by (ratio column)
    notes: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        workload: str,
        subject: str,
        unit: str,
        values: list[float],
        *,
        higher_is_better: bool = False,
        baseline: str | None = None,
        notes: str = "",
        extra: dict[str, float] | None = None,
    ) -> Row:
        """The row for repeated figures *values*: their median and spread."""
        ordered = sorted(values)
        return cls(
            workload,
            subject,
            unit,
            statistics.median(ordered),
            ordered[0],
            ordered[-1],
            len(ordered),
            higher_is_better,
            baseline,
            notes,
            extra or {},
        )


def measure(run: Callable[[], float], *, repeats: int) -> tuple[float, float, float]:
    """Call *run* (which returns one figure) *repeats* times: (median, min, max)."""
    figures = [run() for _ in range(repeats)]
    return statistics.median(figures), min(figures), max(figures)


class Suite:
    """Collects rows and prints progress to stderr as it goes."""

    def __init__(self, *, quick: bool, progress: bool = True) -> None:
        self.quick = quick
        self.progress = progress
        self.rows: list[Row] = []

    def say(self, message: str) -> None:
        if self.progress:
            print(f"  {message}", file=sys.stderr, flush=True)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        self.say(
            f"{row.workload} / {row.subject}: {_fmt(row.median)} {row.unit} "
            f"[{_fmt(row.low)}-{_fmt(row.high)}]"
        )
        return row


def _fmt(value: float) -> str:
    if value >= 100_000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def render(rows: list[Row]) -> str:
    """A markdown table: median, spread, and the ratio to the row's baseline in the same run."""
    lines = [
        "| workload | subject | median | spread (min-max) | vs baseline | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    by_key = {(r.workload, r.subject): r for r in rows}
    for row in rows:
        ratio = ""
        if row.baseline is not None and (row.workload, row.baseline) in by_key:
            base = by_key[(row.workload, row.baseline)].median
            if base:
                ratio = f"{row.median / base:.2f}x {row.baseline}"
        lines.append(
            f"| {row.workload} | {row.subject} | {_fmt(row.median)} {row.unit} | "
            f"{_fmt(row.low)}-{_fmt(row.high)} | {ratio} | {row.notes} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, str]:
    """Where the figures come from: CPU, cores, Python, and the packages compared."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "date": time.strftime("%Y-%m-%d"),
    }
    for package in ("keylock", "redis", "portalocker", "asyncio-keyed-lock", "filelock"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info


def to_json(rows: list[Row]) -> str:
    return json.dumps({"machine": machine(), "rows": [asdict(r) for r in rows]}, indent=2)
