"""``keylock bench``: plan the steps of every suite, run them under a progress display, then
print the table and the verdicts (and write JSON, the chart, the README section)."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from typing import TYPE_CHECKING

from .._console import SUITES, CliError, _scrub, check_redis_url, printable, redact, redis_failure
from ..errors import KeylockError
from . import plot
from .harness import Mode, Suite, from_json, machine, render, render_verdicts, to_json
from .progress import Progress, Step, run_steps

if TYPE_CHECKING:
    import argparse

    from .harness import Row

__all__ = ["bench"]

_TITLES = {"quick": "quick", "headline": "headline", "full": "full"}


def bench(args: argparse.Namespace) -> int:
    """Run (or re-render) a benchmark; the exit status."""
    if args.plot and not plot.available():
        raise CliError(plot.MISSING, code=2)  # before the run, not after it
    if args.from_json:
        rows, info = _load(args.from_json)
    else:
        rows, info = _run(args)
    mode = info.get("mode", "full")
    print(f"\n## keylock bench ({_TITLES.get(mode, mode)})\n")
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
        _rewrite_readme(args.readme, rows, info, args.plot, mode=mode)
    return 0


def _load(path: str) -> tuple[list[Row], dict[str, str]]:
    if not os.path.isfile(path):
        raise CliError(
            f"--from-json {printable(path)!r}: no such file (write one with --json)", code=2
        )
    with open(path) as fh:
        text = fh.read()
    try:
        return from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise CliError(
            f"--from-json {printable(path)!r} is not a run saved by --json ({exc})", code=2
        ) from None


def _run(args: argparse.Namespace) -> tuple[list[Row], dict[str, str]]:
    import redis

    suites = args.only or SUITES
    if args.redis_url and {"redis", "scale"} & set(suites):
        _check_server(args.redis_url)  # before minutes of other suites, not after
    mode: Mode = "quick" if args.quick else "full" if args.full else "headline"
    suite = Suite(mode=mode)
    suite.info.update(machine(), mode=mode)
    print(
        "keylock bench on " + ", ".join(f"{k} {v}" for k, v in suite.info.items()),
        file=sys.stderr,
    )
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            steps: list[Step] = []
            for name in suites:
                module = importlib.import_module(f"keylock._bench.{name}")
                if name in ("redis", "scale"):
                    steps += module.steps(suite, stack, redis_url=args.redis_url)
                elif name == "postgres":
                    url, asked = args.postgres_url, "postgres" in (args.only or ())
                    steps += module.steps(suite, stack, postgres_url=url, asked=asked)
                elif name == "file":
                    steps += module.steps(suite, stack)
                else:
                    steps += module.steps(suite)
            suite.reporter = Progress(sum(s.estimate for s in steps), len(steps))
            run_steps(steps, suite.reporter)
    except redis.RedisError as exc:
        raise redis_failure(exc, args.redis_url or "") from None
    except Exception as exc:
        if type(exc).__module__.partition(".")[0] not in ("psycopg", "psycopg_pool"):
            raise
        raise _postgres_failure(exc, args.postgres_url) from None
    except KeylockError as exc:
        raise CliError(f"the benchmark failed: {exc}") from None
    suite.info["seconds"] = f"{time.monotonic() - started:.0f}"
    print(f"[done] {suite.info['seconds']} s", file=sys.stderr, flush=True)
    return suite.rows, suite.info


def _postgres_failure(exc: Exception, url: str | None) -> CliError:
    """The one-line report of a psycopg error met while benchmarking Postgres at *url*."""
    where = redact(url) if url else "started by the benchmark"
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CliError(f"the Postgres server {where} failed: {_scrub(detail, url or '')}")


def _check_server(url: str) -> None:
    import redis

    check_redis_url(url)
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise redis_failure(exc, url) from None
    finally:
        client.close()


def _title(info: dict[str, str]) -> str:
    facts = ("cpu", "cores", "python", "server", "date")
    return ", ".join(f"{k} {info[k]}" for k in facts if k in info)


def _rewrite_readme(
    path: str, rows: list[Row], info: dict[str, str], chart: str | None, *, mode: str
) -> None:
    from .readme import rewrite, section

    if chart is not None:  # as the README links it: relative to the README's directory
        chart = os.path.relpath(chart, os.path.dirname(os.path.abspath(path)))
    with open(path) as fh:
        text = fh.read()
    with open(path, "w") as fh:
        fh.write(rewrite(text, section(rows, info, chart=chart, mode=mode)))
