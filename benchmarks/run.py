"""Run the contention benchmarks from a checkout: ``python benchmarks/run.py [--quick]``.

The suites live in ``keylock/_bench/`` so that ``python -m keylock bench`` works from an
installed wheel; this script saves their output next to it, in ``results/`` (table, JSON and,
with matplotlib, the chart, in ``docs/assets/``), and a full run also rewrites the generated
section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from keylock._bench import plot
from keylock.cli import main

if __name__ == "__main__":
    here = Path(__file__).parent
    results = here / "results"
    results.mkdir(exist_ok=True)
    args = ["bench", "--json", str(results / "latest.json"), *sys.argv[1:]]
    if plot.available():
        args += ["--plot", str(here.parent / "docs" / "assets" / "handoffs.png")]
    if "--quick" not in sys.argv[1:]:  # the committed tables are of a full run
        args += ["--full", "--readme", str(here.parent / "docs" / "benchmarks.md")]
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        code = main(args)
    (results / "latest.md").write_text(table.getvalue())
    print(table.getvalue())
    sys.exit(code)
