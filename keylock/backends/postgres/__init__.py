"""Postgres backend: per-key leases in a table, see :class:`PostgresBackend`.

Importing this package does not import psycopg; constructing a backend does.
"""

from __future__ import annotations

from .backend import PostgresBackend

__all__ = ["PostgresBackend"]
