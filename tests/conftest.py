"""Shared fixtures: every conformance test runs over every backend and both API flavours.

A new backend joins the suite with one entry in ``BACKENDS``: a fixture-style factory that
yields ``make(**options)`` — a function returning a *new client* of one shared store (two calls
give two clients that must exclude each other, as two processes or hosts would). The one option
the suite passes is ``auto_renew=False`` (leases must be allowed to expire); backends that never
renew ignore it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from keylock.backends import Backend, MemoryBackend

from ._pg_server import PgServer, running_postgres
from ._redis_server import Cluster, Server, running_cluster, running_server
from .conformance._driver import Driver, flavours

MakeBackend = Callable[..., Backend]


def _memory(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    shared = MemoryBackend()

    def make(*, auto_renew: bool = True) -> Backend:
        return shared  # one process, one store: every "client" is the same backend

    yield make


class _ReferenceMemory(MemoryBackend):
    """MemoryBackend through its plain methods (a subclass keeps the per-instance fast paths
    off), so the reference step and release are held to the same suite as the fast ones."""

    def _try_acquire(self, *args: object) -> object:  # type: ignore[override]
        return super()._try_acquire(*args)  # type: ignore[arg-type]

    def release_sync(self, *args: object) -> None:  # type: ignore[override]
        super().release_sync(*args)  # type: ignore[arg-type]


def _memory_reference(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    shared = _ReferenceMemory()

    def make(*, auto_renew: bool = True) -> Backend:
        return shared

    yield make


def _file(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    directory = request.getfixturevalue("tmp_path") / "locks"

    def make(*, auto_renew: bool = True) -> Backend:
        from keylock.backends import FileBackend

        return FileBackend(directory)  # a new client each call, as another process would be

    yield make


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Server]:
    """One real server for the session (see tests/_redis_server.py); tests flush it."""
    with running_server() as server:
        yield server


def _redis(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    server: Server = request.getfixturevalue("redis_server")
    server.flush()

    def make(*, auto_renew: bool = True) -> Backend:
        from keylock.backends import RedisBackend

        # a new client each call, as another host would be
        return RedisBackend.from_url(server.url, auto_renew=auto_renew)

    yield make


def _redis_fake(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    """Redis in this process (fakeredis, its Lua run by lupa): fast, and it keeps the
    backend working with the fake clients users test their code with."""
    import fakeredis

    server = fakeredis.FakeServer()  # a new one per test: nothing to flush

    def make(*, auto_renew: bool = True) -> Backend:
        from keylock.backends import RedisBackend

        # a sync client only: the async flavour runs on the async twin the backend derives
        return RedisBackend(fakeredis.FakeRedis(server=server), auto_renew=auto_renew)

    yield make


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """A real three-master Redis Cluster for the session (see tests/_redis_server.py)."""
    with running_cluster() as cluster:
        yield cluster


def _redis_cluster(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    cluster: Cluster = request.getfixturevalue("redis_cluster")
    cluster.flush()

    def make(*, auto_renew: bool = True) -> Backend:
        from keylock.backends import RedisBackend

        url = f"redis://{cluster.host}:{cluster.port}/0"
        return RedisBackend.from_url(url, cluster=True, auto_renew=auto_renew)

    yield make


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """One real PostgreSQL for the session (see tests/_pg_server.py); tests flush it."""
    with running_postgres() as server:
        yield server


def _postgres(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    server: PgServer = request.getfixturevalue("postgres_server")
    server.flush()

    def make(*, auto_renew: bool = True) -> Backend:
        from keylock.backends import PostgresBackend

        # a new client each call, as another host would be
        return PostgresBackend.from_url(server.url, auto_renew=auto_renew)

    yield make


# name -> generator of a backend factory. File and Redis backends add themselves here.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Iterator[MakeBackend]]] = {
    "memory": _memory,
    "memory-reference": _memory_reference,
    "file": _file,
    "redis": _redis,
    "redis-fake": _redis_fake,
    "redis-cluster": _redis_cluster,
    "postgres": _postgres,
}


@pytest.fixture(params=list(BACKENDS))
async def make_backend(request: pytest.FixtureRequest) -> AsyncIterator[MakeBackend]:
    """``make()`` returns a client of one store shared within the test; every client made is
    closed after the test, on the test's event loop (async connections belong to it)."""
    factory = BACKENDS[request.param](request)
    make = next(factory)
    made: list[Backend] = []

    def tracked(**options: object) -> Backend:
        backend = make(**options)
        if backend not in made:
            made.append(backend)
        return backend

    yield tracked
    for backend in made:
        await backend.close()
    for _ in factory:  # run the factory's own teardown
        pass


@pytest.fixture(params=flavours())
def driver(request: pytest.FixtureRequest) -> Driver:
    """The API flavour under test: async methods, or their _sync twins run in threads."""
    return request.param  # type: ignore[no-any-return]
