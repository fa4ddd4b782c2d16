"""The chart: hand-offs/s against workers, one line per library, one panel per backend family
(matplotlib, the optional ``plot`` extra, imported only here and only when asked for)."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .harness import Row

__all__ = ["MISSING", "available", "write"]

MISSING = "--plot needs matplotlib: pip install 'python-keylock[plot]'"


def available() -> bool:
    """Whether matplotlib can be imported (checked before a long run, not after it)."""
    return importlib.util.find_spec("matplotlib") is not None


def write(rows: Sequence[Row], path: str, *, title: str = "") -> None:
    """Save a PNG of every row that has a ``family`` to *path*: median and min-max spread of
    hand-offs/s (ops/s for one worker) per library, against workers, log scales."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r.family for r in rows if r.family))
    if not families:
        raise ValueError("no contention rows to plot (run the hot key workloads)")
    columns = min(2, len(families))
    rows_of_panels = -(-len(families) // columns)
    figure, axes = plt.subplots(
        rows_of_panels, columns, figsize=(6.4 * columns, 4.4 * rows_of_panels), squeeze=False
    )
    panels = [ax for row in axes for ax in row]
    for ax in panels[len(families) :]:
        ax.set_visible(False)
    for ax, family in zip(panels, families, strict=False):
        mine = [r for r in rows if r.family == family]
        for subject in dict.fromkeys(r.subject for r in mine):
            line = sorted((r for r in mine if r.subject == subject), key=lambda r: r.workers)
            xs = [r.workers for r in line]
            ys = [r.median for r in line]
            below = [r.median - r.low for r in line]
            above = [r.high - r.median for r in line]
            keylock = subject.startswith("keylock")
            ax.errorbar(
                xs,
                ys,
                yerr=[below, above],
                label=subject,
                marker="o",
                markersize=4,
                capsize=3,
                linewidth=2.6 if keylock else 1.2,
                color="black" if keylock else None,  # keylock: the same line in every panel
                zorder=3 if keylock else 2,
                linestyle="-" if keylock else "--",
            )
        ax.set_title(family)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        workers = sorted({r.workers for r in mine})
        ax.set_xticks(workers, [str(w) for w in workers])
        ax.set_xlabel("workers on one key")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylabel("hand-offs/s (1 worker: acquisitions/s)")
        ax.legend(fontsize=7, loc="best")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
