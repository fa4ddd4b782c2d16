"""``python -m keylock`` / ``keylock``: ``bench`` runs the contention benchmarks, ``inspect``
lists held locks (Redis or a lock directory), ``release --force`` breaks one on Redis."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._bench.harness import Row

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
    bench.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw hand-offs/s against workers as a PNG (pip install 'python-keylock[plot]')",
    )
    bench.add_argument(
        "--readme",
        metavar="FILE",
        help="rewrite the section between <!-- bench:start --> and <!-- bench:end --> in FILE",
    )
    bench.add_argument(
        "--from-json",
        metavar="FILE",
        help="render (table, --plot, --readme) from a saved --json run instead of running",
    )
    bench.add_argument("--redis-url", help="benchmark against this server instead of starting one")

    inspect = commands.add_parser("inspect", help="list held locks: holder, token, TTL, waiters")
    where = inspect.add_mutually_exclusive_group(required=True)
    where.add_argument("--redis-url", help="a RedisBackend's server")
    where.add_argument("--dir", help="a FileBackend's lock directory")
    inspect.add_argument("--prefix", default="keylock", help="RedisBackend prefix")

    release = commands.add_parser("release", help="force-release a lock on Redis")
    release.add_argument("key", help="the key as stored, namespace included (ns:key)")
    release.add_argument("--force", action="store_true", required=True)
    release.add_argument("--redis-url", required=True)
    release.add_argument("--prefix", default="keylock")
    release.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def _inspect(args: argparse.Namespace) -> int:
    from ._inspect import inspect_directory, inspect_redis

    held = list(
        inspect_redis(args.redis_url, prefix=args.prefix)
        if args.redis_url
        else inspect_directory(args.dir)
    )
    print(f"{'key':40} {'token':>18} {'ttl s':>8} {'waiting':>7}  holder")
    for lock in held:
        ttl = "-" if lock.ttl is None else f"{lock.ttl:.1f}"
        holder = f"pid {lock.holder_pid}" if lock.holder_pid else (lock.owner or "?")
        print(f"{lock.key:40} {lock.token or '-':>18} {ttl:>8} {lock.waiting:>7}  {holder}")
    print(f"{len(held)} held")
    return 0


def _release(args: argparse.Namespace) -> int:
    from ._inspect import force_release_redis

    if not args.yes:
        answer = input(
            f"Force-release {args.key!r}? Its holder keeps running unprotected "
            "(its writes must be fenced). [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("not released")
            return 1
    released = force_release_redis(args.redis_url, args.key, prefix=args.prefix)
    print("released" if released else f"{args.key!r} was not held")
    return 0 if released else 1


def _bench(args: argparse.Namespace) -> int:
    from ._bench import plot
    from ._bench.harness import Suite, from_json, machine, render, render_verdicts, to_json

    if args.plot and not plot.available():
        print(plot.MISSING, file=sys.stderr)  # before the run, not after it
        return 2
    started = time.monotonic()
    if args.from_json:
        with open(args.from_json) as fh:
            rows, info = from_json(fh.read())
        quick = info.get("mode") == "quick"
    else:
        quick = args.quick
        suite = Suite(quick=quick)
        suite.info.update(machine(), mode="quick" if quick else "full")
        print(
            "keylock bench on " + ", ".join(f"{k} {v}" for k, v in suite.info.items()),
            file=sys.stderr,
        )
        for name in args.only or SUITES:
            print(f"[{name}] {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
            module = importlib.import_module(f"keylock._bench.{name}")
            module.run(suite, redis_url=args.redis_url) if name == "redis" else module.run(suite)
        rows, info = suite.rows, suite.info
        info["seconds"] = f"{time.monotonic() - started:.0f}"
        print(f"[done] {info['seconds']} s", file=sys.stderr, flush=True)
    print(f"\n## keylock bench ({'quick' if quick else 'full'})\n")
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "\n")
    print(render(rows))
    print("\nkeylock against the fastest peer of each workload:\n")
    print(render_verdicts(rows))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(to_json(rows, info))
    if args.plot:
        plot.write(rows, args.plot, title=_title(info))
    if args.readme:
        _rewrite_readme(args.readme, rows, info, args.plot, quick=quick)
    return 0


def _title(info: dict[str, str]) -> str:
    facts = ("cpu", "cores", "python", "server", "date")
    return ", ".join(f"{k} {info[k]}" for k in facts if k in info)


def _rewrite_readme(
    path: str, rows: list[Row], info: dict[str, str], chart: str | None, *, quick: bool
) -> None:
    from ._bench.readme import rewrite, section

    if chart is not None:  # as the README links it: relative to the README's directory
        chart = os.path.relpath(chart, os.path.dirname(os.path.abspath(path)))
    with open(path) as fh:
        text = fh.read()
    with open(path, "w") as fh:
        fh.write(rewrite(text, section(rows, info, chart=chart, quick=quick)))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "release":
        return _release(args)
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
