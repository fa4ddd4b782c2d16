"""Shared fixtures: every conformance test runs over every backend and both API flavours.

A new backend joins the suite with one entry in ``BACKENDS``: a fixture-style factory that
yields ``make(**options)`` — a function returning a *new client* of one shared store (two calls
give two clients that must exclude each other, as two processes or hosts would). The one option
the suite passes is ``auto_renew=False`` (leases must be allowed to expire); backends that never
renew ignore it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from keylock.backends import Backend, MemoryBackend

from .conformance._driver import Driver, flavours

MakeBackend = Callable[..., Backend]


def _memory(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    shared = MemoryBackend()

    def make(*, auto_renew: bool = True) -> Backend:
        return shared  # one process, one store: every "client" is the same backend

    yield make


# name -> generator of a backend factory. File and Redis backends add themselves here.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Iterator[MakeBackend]]] = {
    "memory": _memory,
}


@pytest.fixture(params=list(BACKENDS))
def make_backend(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    """``make()`` returns a client of one store shared within the test."""
    yield from BACKENDS[request.param](request)


@pytest.fixture(params=flavours())
def driver(request: pytest.FixtureRequest) -> Driver:
    """The API flavour under test: async methods, or their _sync twins run in threads."""
    return request.param  # type: ignore[no-any-return]
