"""Run the contention benchmarks from a checkout: ``python benchmarks/run.py [--quick]``.

The suites live in ``keylock/_bench/`` so that ``python -m keylock bench`` works from an
installed wheel; this script only saves their output next to it, in ``results/``.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from keylock.cli import main

if __name__ == "__main__":
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        code = main(["bench", "--json", str(results / "latest.json"), *sys.argv[1:]])
    (results / "latest.md").write_text(table.getvalue())
    print(table.getvalue())
    sys.exit(code)
