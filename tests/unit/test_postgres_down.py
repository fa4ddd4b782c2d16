"""Postgres down (connection refused): an acquire fails within its deadline plus one connect
attempt, naming the server and the cause, never the password, and psycopg_pool's warning per
failed connect attempt stays at debug."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from keylock import BackendUnavailable, KeyedLock
from keylock.backends import PostgresBackend


def _refused_url() -> str:
    with socket.socket() as s:  # a port nothing listens on (closed again at once)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://app:s3cret-pw@127.0.0.1:{port}/app"


@pytest.mark.parametrize("timeout", [0, 0.5])
def test_a_refused_connection_fails_by_the_deadline_with_its_cause(
    timeout: float, caplog: pytest.LogCaptureFixture
) -> None:
    """Fails on the old code: timeout=0 took 5 s and timeout=0.5 took 10 s (the pool's 5 s
    for the try, again for the give-up), saying "couldn't get a connection after 5.00 sec",
    with a WARNING log line per connect attempt."""
    url = _refused_url()
    locks = KeyedLock(PostgresBackend.from_url(url))
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        locks.acquire_sync("k", timeout=timeout)
    took = time.monotonic() - started
    locks.close_sync()
    text = str(info.value)
    # its deadline, one connect attempt (0.5 s), and slack for a loaded machine
    assert took < timeout + 2.0, took
    assert f"127.0.0.1:{url.rsplit(':', 1)[1]}" in text, text
    assert "Connection refused" in text, text
    assert "couldn't get a connection" not in text
    assert "s3cret" not in text
    assert "s3cret" not in repr(info.value.__cause__)
    warned = [
        r for r in caplog.records if r.name == "psycopg.pool" and r.levelno >= logging.WARNING
    ]
    assert warned == [], [r.getMessage() for r in warned]


async def test_an_async_caller_too(caplog: pytest.LogCaptureFixture) -> None:
    """Fails on the old code (10 s, the pool's message)."""
    locks = KeyedLock(PostgresBackend.from_url(_refused_url()))
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="Connection refused"):
        await locks.acquire("k", timeout=0.5)
    assert time.monotonic() - started < 2.5
    await locks.close()
