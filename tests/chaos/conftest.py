"""The chaos report: a session-wide collector of every chaos test's figures, printed as one
table per fault at the end of the run (only when chaos tests ran; tests/conftest.py prints it,
and gathers the rows of every pytest-xdist worker)."""

from __future__ import annotations

import pytest

from ._report import REPORT, Report


@pytest.fixture
def chaos_report() -> Report:
    """The session's report: ``chaos_report.record(fault, case, verdict, trials=n)``."""
    return REPORT
