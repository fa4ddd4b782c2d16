"""``python -m keylock`` / ``keylock``: ``bench`` runs the contention benchmarks."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]

#: Benchmark suites, run in this order; each is a module ``keylock._bench.<name>`` with
#: ``run(suite, **options)``.
SUITES = ("memory", "file", "redis")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keylock", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="contention benchmarks: every keylock backend against the peers, in one run",
    )
    bench.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    bench.add_argument(
        "--only", action="append", choices=SUITES, help="run only this suite (repeatable)"
    )
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--redis-url", help="benchmark against this server instead of starting one")
    return parser


def _bench(args: argparse.Namespace) -> int:
    from ._bench.harness import Suite, machine, render, to_json

    suite = Suite(quick=args.quick)
    info = machine()
    print(
        "keylock bench on " + ", ".join(f"{k} {v}" for k, v in info.items()),
        file=sys.stderr,
    )
    for name in args.only or SUITES:
        try:
            module = importlib.import_module(f"keylock._bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"keylock._bench.{name}":
                raise
            suite.say(f"{name}: no benchmark suite in this version")
            continue
        print(f"[{name}]", file=sys.stderr, flush=True)
        module.run(suite, redis_url=args.redis_url) if name == "redis" else module.run(suite)
    print(f"\n## keylock bench ({'quick' if args.quick else 'full'})\n")
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "\n")
    print(render(suite.rows))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(to_json(suite.rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
