"""Figures of the chaos run, one table per fault, printed at the end of the session.

Every chaos test records what its history checker found (``record``); ``pytest_terminal_summary``
in ``conftest.py`` prints the tables when any chaos test ran. ``KEYLOCK_CHAOS_SCALE=10`` (what
``nox -s chaos`` sets) multiplies the trials of every test; the default keeps CI short.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ._history import Verdict

SCALE = max(1, int(os.environ.get("KEYLOCK_CHAOS_SCALE", "1")))


def scaled(trials: int) -> int:
    """*trials* times the chaos scale."""
    return trials * SCALE


@dataclass
class Row:
    trials: int = 0
    grants: int = 0
    overlaps: int = 0
    stale_writes_accepted: int = 0
    token_regressions: int = 0
    timed_out: int = 0
    errors: int = 0
    hangs: int = 0
    max_handoff: float | None = None
    notes: str = ""


_COUNTS = ("trials", "grants", "overlaps", "stale_writes_accepted", "token_regressions")
_COUNTS += ("timed_out", "errors", "hangs")


FAULTS = (  # the order of the tables
    "Holder killed mid-section",
    "Holder paused past its TTL (SIGSTOP), then resumed",
    "Holder paused past its TTL (in-process pause), others take over",
    "Redis restarted without persistence (leases held, waiters waiting)",
    "Postgres restarted (leases held, waiters waiting)",
    "CLIENT KILL mid-renewal",
    "CLIENT KILL mid-release",
    "pg_terminate_backend mid-renewal",
    "pg_terminate_backend mid-release",
    "Renewals late (proxy delays client -> Redis)",
    "Releases lost (proxy black-holes the release)",
    "Network storm (delays, drops, cuts at random)",
    "Crowds on one key",
    "100,000 keys held at once",
    "Cancellation storm during hand-offs",
    "Single-flight callers cancelled at random",
    "Random decorator stacks",
    "Random backend-level parameters",
    "Observers raising at random hooks",
    "Event loops blocked at random points",
    "TTLs shortened with extend()",
)

COLUMNS = (
    "case",
    "trials",
    "grants",
    "overlaps",
    "stale writes accepted",
    "token regressions",
    "waiters timed out",
    "clear errors",
    "hangs past timeout",
    "max hand-off delay",
    "notes",
)


class Report:
    """Rows by fault, then by case (backend or variant); repeated records add up."""

    def __init__(self) -> None:
        self.faults: dict[str, dict[str, Row]] = {}

    def record(
        self, fault: str, case: str, verdict: Verdict, *, trials: int, notes: str = ""
    ) -> None:
        row = self.faults.setdefault(fault, {}).setdefault(case, Row())
        row.trials += trials
        row.grants += verdict.grants
        row.overlaps += len(verdict.overlaps)
        row.stale_writes_accepted += len(verdict.stale_writes_accepted)
        row.token_regressions += len(verdict.token_regressions)
        row.timed_out += verdict.timed_out
        row.errors += verdict.waits.get("error", 0)
        row.hangs += len(verdict.hangs)
        if verdict.max_handoff is not None:
            row.max_handoff = max(row.max_handoff or 0.0, verdict.max_handoff)
        if notes:  # notes speak for the whole row: a later record restates them
            row.notes = notes

    def dump(self) -> dict[str, dict[str, dict[str, object]]]:
        """The rows as plain data (a pytest-xdist worker hands them to the controller)."""
        return {
            fault: {case: asdict(row) for case, row in rows.items()}
            for fault, rows in self.faults.items()
        }

    def merge(self, dumped: dict[str, dict[str, dict[str, object]]]) -> None:
        """Add the rows of another report's ``dump()`` to this one's, as ``record`` would."""
        for fault, rows in dumped.items():
            for case, fields in rows.items():
                other = Row(**fields)  # type: ignore[arg-type]
                row = self.faults.setdefault(fault, {}).setdefault(case, Row())
                for name in _COUNTS:
                    setattr(row, name, getattr(row, name) + getattr(other, name))
                if other.max_handoff is not None:
                    row.max_handoff = max(row.max_handoff or 0.0, other.max_handoff)
                row.notes = other.notes or row.notes

    def tables(self) -> list[str]:
        """One Markdown table per fault, in the issue's order of faults, then the others."""
        out = []
        order = {name: i for i, name in enumerate(FAULTS)}
        for fault, rows in sorted(self.faults.items(), key=lambda f: order.get(f[0], len(order))):
            lines = [f"{fault}", "", "| " + " | ".join(COLUMNS) + " |"]
            lines.append("|---|" + "---:|" * (len(COLUMNS) - 2) + "---|")
            for case, row in rows.items():
                handoff = "-" if row.max_handoff is None else f"{row.max_handoff * 1000:.1f} ms"
                cells = [
                    case,
                    f"{row.trials:,}",
                    f"{row.grants:,}",
                    str(row.overlaps),
                    str(row.stale_writes_accepted),
                    str(row.token_regressions),
                    f"{row.timed_out:,}",
                    f"{row.errors:,}",
                    str(row.hangs),
                    handoff,
                    row.notes,
                ]
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
        return out


REPORT = Report()
