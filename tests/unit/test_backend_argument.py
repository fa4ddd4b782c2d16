"""A URL string (or anything but a backend) given as a lock's backend: a TypeError naming
every backend and, for a URL, the from_url call that makes one of it."""

from __future__ import annotations

import pytest

from keylock import KeyedLock, KeyedRWLock, KeyedSemaphore

BACKENDS = "MemoryBackend, FileBackend, RedisBackend, PostgresBackend"


@pytest.mark.parametrize(
    ("given", "hint"),
    [
        ("redis://localhost:6379/0", "RedisBackend.from_url(url)"),
        ("postgresql://app@db/app", "PostgresBackend.from_url(url)"),
        ("postgres://app@db/app", "PostgresBackend.from_url(url)"),
        ("/var/lock/app", "FileBackend(path)"),
    ],
)
def test_a_url_string_names_its_from_url(given: str, hint: str) -> None:
    """Fails on the old code: KeyedLock named three backends (no PostgresBackend) and no
    from_url."""
    for make in (KeyedLock, KeyedRWLock, lambda b: KeyedSemaphore(b, limit=2)):
        with pytest.raises(TypeError, match="takes a keylock backend") as info:
            make(given)  # type: ignore[arg-type]
        assert BACKENDS in str(info.value)
        assert hint in str(info.value)


def test_another_object_names_every_backend() -> None:
    with pytest.raises(TypeError, match="takes a keylock backend") as info:
        KeyedLock(42)  # type: ignore[arg-type]
    assert f"({BACKENDS}), not int" in str(info.value)
