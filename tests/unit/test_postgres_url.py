"""PostgresBackend.from_url on a malformed URL: a ValueError naming the expected form (and the
backend meant, for another backend's URL), never the password."""

from __future__ import annotations

import pytest

from keylock.backends import PostgresBackend

BAD = [
    "postgres+x://app:s3cret-pw@host/app",  # unknown scheme (psycopg echoed the whole URL)
    "mysql://app:s3cret-pw@host/app",
    "postgresql://app:s3cret-pw@host/app?bogus=1",  # unknown query parameter
    "host=h password=s3cret-pw bogus",  # conninfo missing "="
    "host=h password='s3cret-pw' bogus",
    "postgresql://app:s3cret%2Dpw@host/app?bogus=1",  # the password percent-encoded
]


@pytest.mark.parametrize("url", BAD)
def test_a_malformed_url_names_the_form_never_the_password(url: str) -> None:
    """Fails on the old code: psycopg's message, which echoes the DSN, was shown verbatim."""
    with pytest.raises(ValueError, match="expected postgresql://") as info:
        PostgresBackend.from_url(url)
    text = str(info.value)
    assert "s3cret" not in text, text
    assert "s3cret" not in repr(info.value)
    assert info.value.__cause__ is None  # (psycopg's error holds the password)
    assert info.value.__context__ is None
    assert "postgresql://user:password@host:port/dbname" in text, text
    assert "***" in text, text


@pytest.mark.parametrize(
    "url", ["redis://:s3cret-pw@host:6379/0", "rediss://u:s3cret-pw@host/0", "redis+sentinel://h"]
)
def test_a_redis_url_says_it_is_one(url: str) -> None:
    """Fails on the old code: 'missing "=" after <the URL>' told nothing and showed the
    password."""
    with pytest.raises(ValueError, match="not a Postgres one") as info:
        PostgresBackend.from_url(url)
    text = str(info.value)
    assert "s3cret" not in text, text
    assert "RedisBackend.from_url(url)" in text, text


@pytest.mark.parametrize(
    ("options", "near"),
    [({"tll": 5}, "ttl"), ({"sslmod": "disable"}, "sslmode"), ({"durabel": True}, "durable")],
)
def test_a_misspelt_option_is_a_type_error_at_once(options: dict[str, object], near: str) -> None:
    """An option that is neither from_url's nor psycopg.connect's (a libpq parameter) is a
    TypeError naming it and the nearest known one, before any connection. Fails on the old
    code: from_url took it, and the first acquire came back BackendUnavailable ('invalid
    connection option'), a config bug reported as an outage."""
    with pytest.raises(TypeError, match=f"did you mean {near!r}") as info:
        PostgresBackend.from_url("postgresql://app:s3cret-pw@host/app", **options)
    assert next(iter(options)) in str(info.value)
    assert "s3cret" not in str(info.value)


def test_libpq_and_psycopg_options_are_taken() -> None:
    backend = PostgresBackend.from_url(
        "postgresql://app@host/app", sslmode="disable", application_name="x", prepare_threshold=3
    )
    backend.close_sync()
