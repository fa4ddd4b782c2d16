"""Shared fixtures: every conformance test runs over every backend and both API flavours.

A new backend joins the suite with one entry in ``BACKENDS``: a fixture-style factory that
yields ``make(**options)`` — a function returning a *new client* of one shared store (two calls
give two clients that must exclude each other, as two processes or hosts would). The one option
the suite passes is ``auto_renew=False`` (leases must be allowed to expire); backends that never
renew ignore it.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from keylock.backends import Backend, MemoryBackend
from keylock.backends._permits import MemoryPermits, permit_view
from keylock.backends.base import RW_LIMIT

from ._pg_server import PgServer, running_postgres
from ._redis_server import Cluster, Server, running_cluster, running_server
from .chaos._report import REPORT, SCALE
from .conformance._driver import Driver, flavours

MakeBackend = Callable[..., Backend]

_CHAOS_ROWS = "keylock_chaos_report"  # the chaos rows a pytest-xdist worker hands back


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a pytest-xdist worker, hand the chaos rows it recorded to the controller."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output[_CHAOS_ROWS] = REPORT.dump()


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: the controller, per worker
def pytest_testnodedown(node: object, error: object) -> None:
    REPORT.merge(getattr(node, "workeroutput", {}).get(_CHAOS_ROWS, {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The chaos report: one table per fault, when chaos tests ran."""
    tables = REPORT.tables()
    if not tables:
        return
    terminalreporter.section(f"keylock chaos report (KEYLOCK_CHAOS_SCALE={SCALE})")
    for table in tables:
        terminalreporter.write_line("")
        terminalreporter.write_line(table)


def _memory(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    shared = MemoryBackend()

    def make(*, auto_renew: bool = True) -> Backend:
        return shared  # one process, one store: every "client" is the same backend

    yield make


class _ReferenceMemory(MemoryBackend):
    """MemoryBackend through its plain methods (a subclass keeps the per-instance fast paths
    off), so the reference step and release are held to the same suite as the fast ones;
    its permit views likewise."""

    def _try_acquire(self, *args: object) -> object:  # type: ignore[override]
        return super()._try_acquire(*args)  # type: ignore[arg-type]

    def release_sync(self, *args: object) -> None:  # type: ignore[override]
        super().release_sync(*args)  # type: ignore[arg-type]

    def permits(self, limit: int, weight: int = 1) -> Backend:
        return permit_view(self, limit, weight, self.clock, _ReferencePermits)


class _ReferencePermits(MemoryPermits):
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


# Backends whose permits (semaphores, RW locks: Backend.permits) join the conformance suite:
# every backend has them, so this is BACKENDS in full (a new backend joins both lists).
PERMIT_BACKENDS: list[str] = list(BACKENDS)


# Backends whose clients can be made in another process, for the holder counts under
# processes: name -> (request -> a picklable function that makes a new client).
def _file_client(directory: str) -> Backend:
    from keylock.backends import FileBackend

    return FileBackend(directory)


def _postgres_client(url: str) -> Backend:
    from keylock.backends import PostgresBackend

    return PostgresBackend.from_url(url)


def _postgres_process_client(request: pytest.FixtureRequest) -> Callable[[], Backend]:
    server: PgServer = request.getfixturevalue("postgres_server")
    server.flush()
    return functools.partial(_postgres_client, server.url)


def _redis_client(url: str) -> Backend:
    from keylock.backends import RedisBackend

    return RedisBackend.from_url(url)


def _redis_process_url(request: pytest.FixtureRequest) -> str:
    server: Server = request.getfixturevalue("redis_server")
    server.flush()
    return server.url


PROCESS_CLIENTS: dict[str, Callable[[pytest.FixtureRequest], Callable[[], Backend]]] = {
    "file": lambda request: functools.partial(
        _file_client, str(request.getfixturevalue("tmp_path") / "locks")
    ),
    "postgres": _postgres_process_client,
    "redis": lambda request: functools.partial(_redis_client, _redis_process_url(request)),
}
PERMIT_PROCESS_BACKENDS: list[str] = ["file", "redis", "postgres"]

# A permit shape under test: name -> (limit, weight). "sem1" and "write" are exclusive: every
# lock conformance test runs on them unchanged (tests/conformance/conftest.py).
SHAPES: dict[str, tuple[int, int]] = {
    "sem1": (1, 1),
    "sem3": (3, 1),
    "read": (RW_LIMIT, 1),
    "write": (RW_LIMIT, RW_LIMIT),
}


@pytest.fixture(params=list(BACKENDS))
async def make_backend(request: pytest.FixtureRequest) -> AsyncIterator[MakeBackend]:
    """``make()`` returns a client of one store shared within the test; every client made is
    closed after the test, on the test's event loop (async connections belong to it)."""
    async for make in _clients(request, request.param):
        yield make


async def _clients(request: pytest.FixtureRequest, name: str) -> AsyncIterator[MakeBackend]:
    """Run backend *name*'s factory for one test; close every client it made afterwards."""
    factory = BACKENDS[name](request)
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


class PermitClients:
    """One permit shape on one backend, for a test: ``make()`` is a new client's view of the
    shape under test, ``make_shape(limit, weight)`` a new client's view of another shape (of
    the same store), and ``blockers`` what fills a key so a request of the shape must wait."""

    def __init__(self, make_client: MakeBackend, name: str, backend: str = "") -> None:
        self.name = name
        self.backend = backend
        self.limit, self.weight = SHAPES[name]
        self._make_client = make_client

    def __repr__(self) -> str:
        return f"{self.backend} {self.name}" if self.backend else self.name

    @property
    def exclusive(self) -> bool:
        """A lease of this shape excludes every other lease of it (a lock)."""
        return self.weight == self.limit

    @property
    def capacity(self) -> int:
        """How many leases of this shape may be held at once on one key."""
        return self.limit // self.weight

    @property
    def blocker(self) -> tuple[int, tuple[int, int]]:
        """(how many, of which shape) fill a key so that this shape must wait: its own
        ``limit`` of itself, or for an RW reader one writer."""
        if self.name == "read":
            return 1, SHAPES["write"]
        return self.capacity, (self.limit, self.weight)

    def make(self, **options: object) -> Backend:
        return self._make_client(**options).permits(self.limit, self.weight)

    def make_client(self, **options: object) -> Backend:
        """A new client itself (its locks: another keyspace than its permits)."""
        return self._make_client(**options)

    def make_shape(self, limit: int, weight: int, **options: object) -> Backend:
        return self._make_client(**options).permits(limit, weight)


@pytest.fixture(
    params=[
        pytest.param((backend, shape), id=f"{backend}-{shape}")
        for backend in PERMIT_BACKENDS
        for shape in SHAPES
    ]
)
async def permits(request: pytest.FixtureRequest) -> AsyncIterator[PermitClients]:
    """Every permit shape (semaphores of limit 1 and 3, RW readers and writers) on every
    backend in PERMIT_BACKENDS; clients are closed after the test."""
    backend, shape = request.param
    async for make in _clients(request, backend):
        yield PermitClients(make, shape, backend)


@pytest.fixture(params=PERMIT_BACKENDS)
async def make_permit_client(request: pytest.FixtureRequest) -> AsyncIterator[MakeBackend]:
    """``make()``: a new client of a backend in PERMIT_BACKENDS (call ``.permits()`` on it)."""
    async for make in _clients(request, request.param):
        yield make
