"""The check of a Postgres URL given to ``PostgresBackend.from_url``: a malformed one raises a
ValueError that names the expected form and never holds the password (psycopg's own message
echoes the whole string, password included, so its text is scrubbed before it is shown)."""

from __future__ import annotations

import difflib
import functools
import re
from typing import TYPE_CHECKING
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping

__all__ = ["check_options", "check_url", "redact"]

# psycopg.connect's own keyword arguments, beside the libpq connection parameters
_PSYCOPG_ARGS = ("autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory")

_FORM = (
    "expected postgresql://user:password@host:port/dbname (or postgres://...), "
    "or a conninfo string such as 'host=... dbname=... user=...'"
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)", re.IGNORECASE)
_OTHER_BACKENDS = {
    "redis": "RedisBackend.from_url(url)",
    "rediss": "RedisBackend.from_url(url)",
    "unix": "RedisBackend.from_url(url)",
    "redis+sentinel": "RedisBackend.from_url(url)",
    "file": "FileBackend(directory)",
}


def _secrets(url: str) -> list[str]:
    """Every form in which *url*'s password may appear in a message (longest first)."""
    found: list[str] = []
    if "://" in url:
        netloc = url.split("://", 1)[1].split("/", 1)[0]
        userinfo, at, _ = netloc.rpartition("@")
        if at and ":" in userinfo:
            raw = userinfo.split(":", 1)[1]
            found += [raw, unquote(raw)]
    for match in _CONNINFO_PASSWORD.finditer(url):
        value = match.group(2)
        found += [value, value.strip("'")]
    return sorted({s for s in found if s}, key=len, reverse=True)


def redact(url: str) -> str:
    """*url* with its password (URL userinfo or conninfo ``password=``) replaced by ``***``."""
    text = url
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def check_url(url: str) -> None:
    """Return if psycopg can parse *url*; else raise ValueError naming the expected form (and
    the backend meant, for a Redis or file URL), the password never shown."""
    scheme = _SCHEME.match(url)
    name = scheme.group(1).lower() if scheme else None
    shown = redact(url)
    if name is not None and name not in ("postgres", "postgresql"):
        hint = _OTHER_BACKENDS.get(name)
        if hint is None and name.startswith("redis"):
            hint = "RedisBackend.from_url(url)"
        if hint is not None:
            raise ValueError(
                f"{shown!r} is a {name}:// URL, not a Postgres one: use {hint} for it "
                f"(PostgresBackend.from_url: {_FORM})"
            )
        raise ValueError(f"bad Postgres URL {shown!r}: scheme {name}:// unknown; {_FORM}")
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unparsable"
    else:
        return
    # raised outside the except clause: psycopg's error (the password in its text) is not
    # even kept as the ValueError's __context__, which error reporters may show
    reason = reason.replace(url, shown)
    for secret in _secrets(url):
        reason = reason.replace(secret, "***")
    raise ValueError(f"bad Postgres URL {shown!r}: {reason}; {_FORM}")


@functools.cache
def _parameters() -> frozenset[str]:
    """Every keyword ``psycopg.connect`` takes: libpq's connection parameters, and its own."""
    libpq = (option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults())
    return frozenset((*libpq, *_PSYCOPG_ARGS))


def check_options(options: Mapping[str, object], own: Collection[str]) -> None:
    """Return if every key of *options* is a keyword ``psycopg.connect`` takes; else raise
    TypeError naming the first unknown one and the nearest known (among them and *own*, the
    caller's own keywords): a typo such as ``tll=5`` would otherwise reach the server at the
    first call and come back as BackendUnavailable. Values are never shown."""
    unknown = sorted(set(options) - _parameters())
    if not unknown:
        return
    name = unknown[0]
    near = difflib.get_close_matches(name, sorted(_parameters() | set(own)), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise TypeError(
        f"PostgresBackend.from_url() got an unexpected keyword argument {name!r}{hint} (it "
        "takes its own options and psycopg.connect's: libpq connection parameters such as "
        "sslmode or application_name)"
    )
