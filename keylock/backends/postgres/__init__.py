"""Postgres backend: per-key leases in a table, see :class:`PostgresBackend`.

Importing this package does not import psycopg; constructing a backend does.
"""

from __future__ import annotations

from ._admin import force_release as force_release
from .backend import PostgresBackend

__all__ = ["PostgresBackend", "force_release"]
