"""The contention workloads every suite runs: one hot key with 1, 2, 4, 8, 16 workers, and
1,000 keys with Zipf-distributed access; subjects interleaved run by run, each figure the
median of the runs with its spread, waits and violations."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .contend import Run
from .harness import INSTALL, Row, Suite, rotated, wait_figures
from .progress import Step
from .zipf import SEED, zipf_indices

__all__ = [
    "HEADLINE_WORKERS",
    "WORKERS",
    "ZIPF_KEYS",
    "ZIPF_WORKERS",
    "estimate",
    "hot_key",
    "hot_key_steps",
    "zipf",
]

WORKERS = (1, 2, 4, 8, 16)
HEADLINE_WORKERS = 4  # the one hot-key workload of a headline run
ZIPF_KEYS = 1_000
ZIPF_WORKERS = 8
_ZIPF_DRAWS = 50_000  # per worker; a worker cycles through its draws if it gets that far

#: subject name -> run(key sequences, seconds); None when the peer is not installed
Subjects = Sequence[tuple[str, Callable[[Sequence[Sequence[int]], float], Run] | None]]


def estimate(
    subjects: Subjects, seconds: float, repeats: int, *, runs: int = 1, overhead: float = 0.05
) -> float:
    """Seconds a contention step should take: each installed subject runs *runs* workloads
    *repeats* times, each run *seconds* long plus *overhead* (start-up, warm-up, joins)."""
    present = sum(1 for _, run in subjects if run is not None)
    return present * runs * repeats * (seconds + overhead)


def hot_key(
    suite: Suite,
    family: str,
    label: str,
    subjects: Subjects,
    *,
    seconds: float,
    repeats: int,
    workers: Sequence[int] = WORKERS,
    yardsticks: Mapping[str, str] | None = None,
) -> None:
    """One key, *workers* contenders each: hand-offs/s (ops/s for one worker). A subject named
    in *yardsticks* is shown as a reference (not ranked as a peer), with that note."""
    for count in workers:
        workload = f"{family}: hot key, {_plural(count, label)}"
        _interleaved(
            suite, workload, family, count, subjects, [[0]] * count, seconds, repeats, yardsticks
        )


def hot_key_steps(
    suite: Suite,
    family: str,
    label: str,
    subjects: Subjects,
    *,
    seconds: float,
    repeats: int,
    workers: Sequence[int] = WORKERS,
    overhead: float = 0.05,
    yardsticks: Mapping[str, str] | None = None,
) -> list[Step]:
    """:func:`hot_key` as one step per worker count (each its own workload and progress line)."""
    return [
        Step(
            f"{family}: hot key, {_plural(count, label)}",
            estimate(subjects, seconds, repeats, overhead=overhead),
            lambda count=count: hot_key(  # type: ignore[misc]
                suite,
                family,
                label,
                subjects,
                seconds=seconds,
                repeats=repeats,
                workers=(count,),
                yardsticks=yardsticks,
            ),
        )
        for count in workers
    ]


def zipf(
    suite: Suite,
    family: str,
    label: str,
    subjects: Subjects,
    *,
    seconds: float,
    repeats: int,
    workers: int = ZIPF_WORKERS,
) -> None:
    """``ZIPF_KEYS`` keys, Zipf-distributed (s=1, fixed seed per worker): acquisitions/s."""
    keys = [zipf_indices(ZIPF_KEYS, _ZIPF_DRAWS, seed=SEED + i) for i in range(workers)]
    workload = f"{family}: {ZIPF_KEYS:,} Zipf keys, {_plural(workers, label)}"
    _interleaved(suite, workload, "", workers, subjects, keys, seconds, repeats)


def _plural(count: int, noun: str) -> str:
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun}es" if noun.endswith("s") else f"{count} {noun}s"


def _interleaved(
    suite: Suite,
    workload: str,
    family: str,
    workers: int,
    subjects: Subjects,
    keys: Sequence[Sequence[int]],
    seconds: float,
    repeats: int,
    yardsticks: Mapping[str, str] | None = None,
) -> None:
    yardsticks = yardsticks or {}
    present = [(name, run) for name, run in subjects if run is not None]
    for name, run in subjects:
        if run is None:
            suite.say(f"{workload} / {name}: not installed, skipped ({INSTALL})")
    runs: dict[str, list[Run]] = {name: [] for name, _ in present}
    # interleaved, so drift in machine speed hits every subject alike; rotated, so no subject
    # always runs right after the same one
    for _, name, run in rotated(present, repeats):
        runs[name].append(run(keys, seconds))
    # one worker on one key has nobody to hand off to: its figure is ops/s
    handoffs = workers > 1 and all(len(seq) == 1 for seq in keys)
    for name, _ in present:
        done = runs[name]
        ops = sorted(r.ops for r in done)
        extra = wait_figures([r.waits for r in done])
        extra["violations"] = float(sum(r.violations for r in done))
        extra["ops_per_s"] = ops[len(ops) // 2]
        notes = ""
        if handoffs:
            extra["handoffs_per_s"] = sorted(r.handoff_rate for r in done)[len(done) // 2]
            notes = f"{extra['ops_per_s']:,.0f} acquisitions/s"
        if name in yardsticks:
            notes = f"{notes}; {yardsticks[name]}" if notes else yardsticks[name]
        suite.add(
            Row.of(
                workload,
                name,
                "hand-offs/s" if handoffs else "ops/s",
                [r.handoff_rate for r in done] if handoffs else [r.ops for r in done],
                higher_is_better=True,
                notes=notes,
                extra=extra,
                family=family,
                workers=workers,
                reference=name in yardsticks,
            )
        )
