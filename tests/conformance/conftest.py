"""The conformance suite's backends: every backend's locks, and the exclusive permit shapes
(a semaphore of limit 1, an RW writer) of every backend in PERMIT_BACKENDS, through which
each lock test runs unchanged (a lock's guarantees are theirs). The other shapes (limit 3,
RW readers) are checked by test_permits.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ..conftest import BACKENDS, PERMIT_BACKENDS, SHAPES, MakeBackend, _clients

EXCLUSIVE = ["sem1", "write"]


@pytest.fixture(
    params=list(BACKENDS) + [f"{b}+{shape}" for b in PERMIT_BACKENDS for shape in EXCLUSIVE]
)
async def make_backend(request: pytest.FixtureRequest) -> AsyncIterator[MakeBackend]:
    """``make()`` returns a client of one store shared within the test (for a permit row, that
    client's view of the shape); every client is closed after the test."""
    name, _, shape = request.param.partition("+")
    async for make in _clients(request, name):
        if not shape:
            yield make
            continue

        def view(
            *, auto_renew: bool = True, make: MakeBackend = make, shape: str = shape
        ) -> object:
            return make(auto_renew=auto_renew).permits(*SHAPES[shape])

        yield view  # type: ignore[misc]
