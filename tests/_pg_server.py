"""A real PostgreSQL for the tests, started by the tests themselves.

The ``pgserver`` wheel (a dev dependency) ships PostgreSQL 16 and starts it in a temporary
directory, listening on a unix socket only. No server is an error, never a skip: CI must run
these tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator

TABLE = "keylock_leases"


class PgServer:
    """One running server; ``url`` reaches it; ``flush()`` empties keylock's tables."""

    def __init__(self, server: object, directory: str) -> None:
        self._server = server
        self.directory = directory
        self.url: str = server.get_uri()  # type: ignore[attr-defined]

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(sql, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    def restart(self, mode: str = "fast") -> None:
        """Restart the server on the same socket and data: ``fast`` ends every session
        cleanly; ``immediate`` is a crash (no shutdown checkpoint: recovery replays the WAL).
        Committed rows survive either way (``synchronous_commit`` is on by default)."""
        from pgserver._commands import pg_ctl
        from pgserver.utils import PostmasterInfo

        server = self._server
        pgdata = server.pgdata  # type: ignore[attr-defined]
        pg_ctl(["-w", "-m", mode, "restart"], pgdata=pgdata, user=server.system_user, timeout=60)  # type: ignore[attr-defined]
        # the handle must know the new postmaster, or cleanup() would leave it running
        server._postmaster_info = PostmasterInfo.read_from_pgdata(pgdata)  # type: ignore[attr-defined]

    def flush(self, table: str = TABLE) -> None:
        """Empty keylock's tables (tokens still rise: they are floored at the server clock)."""
        if self.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))[0][0]:
            self.execute(f"TRUNCATE {table}, {table}_queue")
        if self.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{table}_permits",))[0][0]:
            self.execute(f"TRUNCATE {table}_permit_keys, {table}_permits, {table}_permit_queue")


@contextlib.contextmanager
def running_postgres() -> Iterator[PgServer]:
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:
        raise RuntimeError("no PostgreSQL for the tests: install the dev extra (pgserver)") from exc
    directory = tempfile.mkdtemp(prefix="keylock-pg-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(directory, cleanup_mode="stop")
    try:
        yield PgServer(server, directory)
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()
        if os.path.isdir(directory):
            shutil.rmtree(directory, ignore_errors=True)
