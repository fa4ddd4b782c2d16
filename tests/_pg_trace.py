"""libpq's protocol trace of a test's pool: round trips and statements counted on the wire."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from psycopg import pq

__all__ = ["Trace", "round_trips", "sent_statements"]


class Trace:
    """libpq's protocol trace of every connection of a pool, into one file."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "trace.txt"
        self._file = self.path.open("w")
        self._mark = 0

    def configure(self, conn: Any) -> None:
        conn.pgconn.trace(self._file.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    async def configure_async(self, conn: Any) -> None:
        self.configure(conn)

    def mark(self) -> None:
        self._file.flush()
        self._mark = os.path.getsize(self.path)

    def since_mark(self) -> list[str]:
        """The messages sent by the client (``F`` lines) since the last mark."""
        self._file.flush()
        with self.path.open() as file:
            file.seek(self._mark)
            return [line for line in file.read().splitlines() if line.startswith("F\t")]

    def close(self) -> None:
        self._file.close()


def round_trips(sent: list[str]) -> int:
    """A Sync (extended protocol) or a Query (simple protocol) waits for ReadyForQuery."""
    return sum(1 for line in sent if line.split("\t")[2] in ("Sync", "Query"))


def sent_statements(sent: list[str]) -> list[str]:
    found = []
    for line in sent:
        _, _, kind, *rest = line.split("\t")
        if kind in ("Parse", "Query"):  # Parse: name, "text", parameter types
            text = re.match(r'\s*(?:"[^"]*" )?"(.*?)"(?: \d+)?', " ".join(rest))
            assert text is not None, line
            found.append(text.group(1))
    return found
