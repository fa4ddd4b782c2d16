"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .._pg_trace import Trace


@pytest.fixture
def trace(tmp_path: Path) -> Iterator[Trace]:
    """The trace of a test's pool (one connection: a second one, opened when the pool grows
    under load, would prepare its statements again and count an extra trip), closed even when
    the test fails."""
    traced = Trace(tmp_path)
    yield traced
    traced.close()
