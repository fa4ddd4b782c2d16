"""What the command line prints: one-line errors, escaped keys, redacted URLs (used by the
``keylock`` command and by its benchmark runner)."""

from __future__ import annotations

import unicodedata
import urllib.parse

__all__ = [
    "SUITES",
    "CliError",
    "check_postgres_url",
    "check_redis_url",
    "missing_table",
    "postgres_failure",
    "printable",
    "redact",
    "redis_failure",
]

#: Benchmark suites, run in this order; each is a module ``keylock._bench.<name>``. ``scale``
#: (Redis at the scale of one process) runs in a full or quick run only.
SUITES = ("memory", "permits", "file", "redis", "postgres", "scale")


class CliError(Exception):
    """A mistake reported as one line on stderr; ``code`` is the exit status (2 usage, 1 run)."""

    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # controls, format/bidi, line breaks


def printable(text: str) -> str:
    """*text* safe for a terminal: control, format (bidi), surrogate and unassigned characters
    as backslash escapes, and backslash doubled, so the output maps back to one string."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in _UNSAFE:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def redact(url: str) -> str:
    """*url* with its password (if any) replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _scrub(text: str, url: str, password: str | None = None) -> str:
    """*text* (an error message) with the password of *url* removed wherever it appears."""
    if password is None:
        try:
            password = urllib.parse.urlsplit(url).password
        except ValueError:
            password = None
    for secret in {password, urllib.parse.unquote(password or "")} - {None, ""}:
        text = text.replace(str(secret), "***")
    return text


# -------------------------------------------------------------------------------- Redis


def check_redis_url(url: str) -> None:
    """Raise :class:`CliError` (usage) unless *url* is a Redis URL redis-py can use."""
    import redis

    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        raise CliError(
            f"--redis-url {redact(url)!r} needs a scheme: redis://HOST:PORT/DB "
            "(rediss:// for TLS, unix:///path/to/socket)",
            code=2,
        )
    try:
        redis.Redis.from_url(url).close()
    except ValueError as exc:
        raise CliError(f"--redis-url {redact(url)!r}: {_scrub(str(exc), url)}", code=2) from None


def redis_failure(exc: BaseException, url: str) -> CliError:
    """The one-line report of a redis-py error met while talking to *url*."""
    import redis

    where = f"the Redis server at {redact(url)}"
    detail = _scrub(str(exc), url).rstrip(".")
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in detail:
        if redact(url) == url:  # no password given
            return CliError(
                f"{where} needs a password: put it in the URL, redis://:PASSWORD@HOST:PORT/DB "
                "(or redis://USER:PASSWORD@HOST:PORT/DB)"
            )
        return CliError(f"{where} refused the user name or password given ({detail})")
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return CliError(f"cannot reach {where}: {detail}")
    return CliError(f"{where} answered with an error: {detail}")


# ----------------------------------------------------------------------------- Postgres


def _conninfo(url: str) -> dict[str, object]:
    import psycopg

    try:
        return dict(psycopg.conninfo.conninfo_to_dict(url))
    except psycopg.ProgrammingError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "unparsable"
        raise CliError(
            f"--postgres-url {_postgres_where(url)!r}: {_scrub(detail, url)}", code=2
        ) from None


def _postgres_where(url: str) -> str:
    """*url* for messages: a URL with its password redacted; a conninfo string as host:port/db."""
    if "://" in url:
        return redact(url)
    from .backends.postgres._wire import address

    return address(url, {})


def check_postgres_url(url: str) -> None:
    """Raise :class:`CliError` (usage) unless *url* is a Postgres URL or conninfo psycopg reads."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in ("postgresql", "postgres") and ("://" in url or "=" not in url):
        raise CliError(
            f"--postgres-url {redact(url)!r} needs a scheme: postgresql://USER@HOST:PORT/DB "
            "(or a conninfo string: 'host=... dbname=...')",
            code=2,
        )
    _conninfo(url)


def postgres_failure(exc: BaseException, url: str) -> CliError:
    """The one-line report of a psycopg error met while talking to *url*."""
    import psycopg

    where = f"the Postgres server at {_postgres_where(url)}"
    password = _conninfo(url).get("password")
    text = str(exc).strip()
    detail = _scrub(text.splitlines()[0] if text else type(exc).__name__, url, str(password or ""))
    detail = detail.rstrip(".")
    if "password authentication failed" in detail:
        return CliError(f"{where} refused the user name or password given ({detail})")
    if "no password supplied" in detail:
        return CliError(
            f"{where} needs a password: put it in the URL, postgresql://USER:PASSWORD@HOST/DB"
        )
    if isinstance(exc, psycopg.OperationalError):
        return CliError(f"cannot reach {where}: {detail}")
    return CliError(f"{where} answered with an error: {detail}")


def missing_table(schema: str, name: str) -> CliError:
    """The report of a --table that names no table (a usage mistake, as a missing --dir)."""
    return CliError(
        f"--table: table {printable(name)!r} does not exist in schema {printable(schema)!r} of "
        "that database: nothing has used it yet, or the name is misspelt (--table is the "
        "PostgresBackend's table=, default keylock_leases)",
        code=2,
    )
