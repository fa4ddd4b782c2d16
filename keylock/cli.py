"""The ``keylock`` command: run the benchmarks, list held locks, force-release one.

Every ordinary mistake (a server that does not answer, a wrong password, a URL without a
scheme, a directory that does not exist, no terminal to confirm on) ends in one line on stderr
that starts with ``keylock:`` and an exit code: 2 for a usage mistake, 1 for a failure at run
time, 130 for Ctrl-C. Passwords never appear in what it prints. Keys and every string a store
returns are printed with control characters escaped, so a key cannot drive the terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from ._inspect import HeldLock

from ._console import (
    SUITES,
    CliError,
    check_postgres_url,
    check_redis_url,
    missing_table,
    postgres_failure,
    printable,
    redact,
    redis_failure,
)

__all__ = ["CliError", "main", "printable", "redact"]

_DESCRIPTION = "keylock's command line: benchmark it, list held locks, break a stuck one."

_EPILOG = "Run 'keylock COMMAND --help' for the options of a command."

_INSPECT_EXAMPLES = """\
examples:
  keylock inspect --redis-url redis://:PASSWORD@localhost:6379/0
  keylock inspect --postgres-url postgresql://app:PASSWORD@db/app
  keylock inspect --dir /run/lock/myapp
"""

_RELEASE_EXAMPLES = """\
examples:
  keylock release --force myapp:job:7 --redis-url redis://localhost:6379/0
  keylock release --force myapp:job:7 --postgres-url postgresql://app@db/app \\
      --owner 1f2e3d4c --yes     # without a terminal: only if that owner still holds it
"""

_RELEASE_FORCE_HELP = (
    "required: breaking a lock is never the default. The holder is shown first and only that "
    "holder's lease is deleted; the holder keeps running unprotected, so its writes must be "
    "fenced"
)

_CONFIRM = (
    "Force-release it from this holder? It keeps running unprotected (its writes must be "
    "fenced). Type its owner's first 8 hex digits to confirm: "
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``keylock:`` line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see: {self.prog} --help)", code=2)


def _version() -> str:
    from . import __version__

    return f"keylock {__version__}"


def _naming(command: argparse.ArgumentParser) -> None:
    """The options naming where a backend keeps its keys, shared by inspect and release."""
    command.add_argument(
        "--prefix", default="keylock", help="the RedisBackend's prefix= (default: %(default)s)"
    )
    command.add_argument(
        "--table",
        default="keylock_leases",
        help="the PostgresBackend's table= (default: %(default)s)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="keylock",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, title="commands", metavar="COMMAND"
    )
    bench = commands.add_parser(
        "bench",
        help="contention benchmarks: each backend against the libraries you\n"
        "would pick instead (progress on stderr)",
        description="By default a headline run of about three minutes: uncontended and one hot "
        "key for each backend (in-process, file, Redis) against its peers. --full runs every "
        "workload, Postgres's too (about twelve minutes).",
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="every workload, full-length runs")
    size.add_argument("--quick", action="store_true", help="every workload, very short runs")
    bench.add_argument(
        "--only", action="append", choices=SUITES, help="run only this suite (repeatable)"
    )
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw hand-offs/s against workers as a PNG (needs the plot extra)",
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
    bench.add_argument(
        "--redis-url",
        help="benchmark on this server instead of starting one; every key the run makes "
        "carries a unique prefix, expires, and is deleted at the end (even on Ctrl-C)",
    )
    bench.add_argument(
        "--postgres-url",
        help="benchmark Postgres on this server (also in a default run) instead of starting "
        "one; keylock's rows go to a table of the run's own, dropped at the end (even on Ctrl-C)",
    )

    inspect = commands.add_parser(
        "inspect",
        help="list held locks (token, TTL, waiters, holder) on a Redis server,\nin a Postgres "
        "table or in a lock directory",
        description="List the locks (and semaphore or RW lock permits) held now: key\n"
        "(namespace:key for a namespaced lock), token, TTL left, waiters, holder.",
        epilog=_INSPECT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = inspect.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--postgres-url", help="a PostgresBackend's database, e.g. postgresql://user@host/db"
    )
    where.add_argument("--redis-url", help="a RedisBackend's server, e.g. redis://host:6379/0")
    where.add_argument("--dir", help="a FileBackend's lock directory")
    _naming(inspect)

    release = commands.add_parser(
        "release",
        help="force-release one lock on Redis or Postgres: shows its holder, asks,\nreleases "
        "only that holder's lease",
        description="Break one lock (or one permit) on Redis or Postgres: the holder is shown,\n"
        "you confirm by typing its owner's first 8 hex digits, and only that holder's lease\n"
        "is deleted; the next waiter gets the key at once.",
        epilog=_RELEASE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    release.add_argument("key", help="the key as stored, namespace included (ns:key)")
    release.add_argument("--force", action="store_true", required=True, help=_RELEASE_FORCE_HELP)
    store = release.add_mutually_exclusive_group(required=True)
    store.add_argument("--redis-url", help="the RedisBackend's server")
    store.add_argument("--postgres-url", help="the PostgresBackend's database")
    store.add_argument("--dir", help=argparse.SUPPRESS)  # refused with the reason, not "unknown"
    _naming(release)
    release.add_argument(
        "--owner",
        help="release only if this owner (as `inspect` showed it, or its first 8+ hex digits) "
        "still holds the key",
    )
    release.add_argument(
        "--yes", action="store_true", help="do not ask for confirmation (needed without a terminal)"
    )
    return parser


# ------------------------------------------------------------------------------- output


def _describe(lock: HeldLock) -> str:
    owner = f"owner {lock.owner}" if lock.owner else "owner ?"
    seen = [f"host {printable(lock.holder_host)}"] if lock.holder_host else []
    if lock.holder_pid:
        seen.append(f"pid {lock.holder_pid}")
    described = printable(owner) + (f" ({', '.join(seen)})" if seen else "")
    if lock.permits is not None:  # a semaphore or an RW lock: how many hold, and the newest
        from .backends.base import RW_LIMIT

        live, limit = lock.permits
        shape = "an RW lock" if limit == RW_LIMIT else f"limit {limit}"
        return f"{live} permit{'s' * (live != 1)} of {shape}; newest: {described}"
    return described


def _inspect(args: argparse.Namespace) -> int:
    from ._inspect import inspect_directory, inspect_postgres, inspect_redis

    if args.redis_url:
        check_redis_url(args.redis_url)
        found: Iterator[HeldLock] = inspect_redis(args.redis_url, prefix=args.prefix)
    elif args.postgres_url:
        check_postgres_url(args.postgres_url)
        found = inspect_postgres(args.postgres_url, table=_table(args.table))
    else:
        if not os.path.isdir(args.dir):
            why = "does not exist" if not os.path.exists(args.dir) else "is not a directory"
            raise CliError(f"--dir {printable(args.dir)!r} {why}", code=2)
        found = inspect_directory(args.dir)
    held = _collect(found, args)
    if not held and args.postgres_url:
        _require_table(args)  # (before the header: "0 held" would pass for an empty table)
    print(f"{'key':40} {'token':>18} {'ttl s':>8} {'waiting':>7}  holder")
    for lock in held:
        ttl = "-" if lock.ttl is None else f"{lock.ttl:.1f}"
        token = "-" if lock.token is None else str(lock.token)
        print(f"{printable(lock.key):40} {token:>18} {ttl:>8} {lock.waiting:>7}  {_describe(lock)}")
        for permit, held_token, pid, owner in lock.holders:  # a lock directory's permit key
            holder = printable(f"{permit}: owner {owner or '?'}") + (f" (pid {pid})" if pid else "")
            print(f"{'':40} {held_token or '-':>18} {'':>8} {'':>7}  {holder}")
    print(f"{len(held)} held")
    return 0


def _table(table: str) -> str:
    from .backends.postgres._sql import schema_for

    try:
        return schema_for(table).table
    except ValueError as exc:
        raise CliError(f"--table: {exc}", code=2) from None


def _require_table(args: argparse.Namespace) -> None:
    """Refuse a --table that does not exist: finding nothing there is not "none held"."""
    import psycopg

    from ._inspect import missing_postgres_table

    try:
        missing = missing_postgres_table(args.postgres_url, table=_table(args.table))
    except psycopg.Error as exc:
        raise postgres_failure(exc, args.postgres_url) from None
    if missing is not None:
        raise missing_table(*missing)


def _collect(found: Iterator[HeldLock], args: argparse.Namespace) -> list[HeldLock]:
    """The locks *found*, a store's error reported as one line."""
    if getattr(args, "postgres_url", None):
        import psycopg

        try:
            return list(found)
        except psycopg.Error as exc:
            raise postgres_failure(exc, args.postgres_url) from None
    if getattr(args, "redis_url", None):
        import redis

        try:
            return list(found)
        except redis.RedisError as exc:
            raise redis_failure(exc, args.redis_url) from None
    return list(found)


def _release(args: argparse.Namespace) -> int:
    from ._inspect import inspect_postgres, inspect_redis

    if args.dir is not None:
        raise CliError(
            "release --force does not apply to a lock directory: a FileBackend lock is an OS "
            "lock of a live process, freed only when that process ends (keylock inspect --dir "
            "shows its pid)",
            code=2,
        )
    named = _owner_prefix(args.owner)

    if args.postgres_url:
        check_postgres_url(args.postgres_url)
        found = inspect_postgres(args.postgres_url, table=_table(args.table))
    else:
        check_redis_url(args.redis_url)
        found = inspect_redis(args.redis_url, prefix=args.prefix)
    holder = next((lock for lock in _collect(found, args) if lock.key == args.key), None)
    if holder is None and args.postgres_url:
        _require_table(args)
    if holder is None or holder.owner is None:
        # the commonest miss: a key passed without the namespace it is stored under
        print(
            f"{printable(args.key)!r} is not held (a namespaced key is stored as "
            "namespace:key; keylock inspect lists the held keys as they are stored)"
        )
        return 1
    ttl = "no expiry" if holder.ttl is None else f"expires in {holder.ttl:.1f} s"
    print(f"{printable(args.key)!r} is held: token {holder.token}, {_describe(holder)}, {ttl}")
    if named is not None and not holder.owner.startswith(named):
        shown = printable(args.key)
        print(f"not released: {shown!r} is held by owner {holder.owner} now, not {named}")
        return 1
    if not args.yes:
        # typing the owner proves the holder shown is the one meant: a lock that changed
        # hands since `inspect` (a stuck lease expired, a healthy worker took it) is spared.
        # Without a terminal nobody reads a prompt: an answer piped in is read without one
        try:
            answer = input(_CONFIRM if sys.stdin and sys.stdin.isatty() else "")
        except (EOFError, RuntimeError):  # (RuntimeError: no sys.stdin at all)
            raise CliError(
                "no terminal to confirm on: pass --yes (and --owner) to force-release without "
                "asking",
                code=2,
            ) from None
        typed = answer.strip().lower()
        if len(typed) < 8 or not holder.owner.startswith(typed):
            print("not released (the owner typed does not match)")
            return 1
    if _force(args, holder.stored or args.key, bytes.fromhex(holder.owner)):
        print("released")
        return 0
    print(f"not released: {printable(args.key)!r} is no longer held by owner {holder.owner}")
    return 1


def _owner_prefix(owner: str | None) -> str | None:
    """The owner named with --owner, as lower-case hex (at least 8 digits), or None."""
    if owner is None:
        return None
    named = owner.strip().lower()
    if len(named) < 8 or any(c not in "0123456789abcdef" for c in named):
        raise CliError(f"--owner takes the owner's hex digits (8 or more), not {owner!r}", code=2)
    return named


def _force(args: argparse.Namespace, key: str, owner: bytes) -> bool:
    """Break *key*'s lease if *owner* still holds it (the next waiter is woken at once)."""
    from ._inspect import force_release_postgres, force_release_redis

    if args.postgres_url:
        import psycopg

        try:
            return force_release_postgres(args.postgres_url, key, table=args.table, owner=owner)
        except psycopg.Error as exc:
            raise postgres_failure(exc, args.postgres_url) from None
    import redis

    try:
        return force_release_redis(args.redis_url, key, prefix=args.prefix, owner=owner)
    except redis.RedisError as exc:
        raise redis_failure(exc, args.redis_url) from None


# --------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status (0 ok, 1 failed at run time, 2 usage, 130 Ctrl-C)."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "bench":
            from ._bench.command import bench

            return bench(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "release":
            return _release(args)
        raise AssertionError(args.command)  # pragma: no cover
    except CliError as exc:
        print(f"keylock: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("keylock: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f" {printable(exc.filename)!r}" if isinstance(exc.filename, str) else ""
        print(f"keylock:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
