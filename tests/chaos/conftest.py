"""The chaos report: a session-wide collector of every chaos test's figures, printed as one
table per fault at the end of the run (only when chaos tests ran)."""

from __future__ import annotations

import pytest

from ._report import REPORT, SCALE, Report


@pytest.fixture
def chaos_report() -> Report:
    """The session's report: ``chaos_report.record(fault, case, verdict, trials=n)``."""
    return REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    tables = REPORT.tables()
    if not tables:
        return
    terminalreporter.section(f"keylock chaos report (KEYLOCK_CHAOS_SCALE={SCALE})")
    for table in tables:
        terminalreporter.write_line("")
        terminalreporter.write_line(table)
