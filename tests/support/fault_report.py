"""The fault suite's summary: one row per fault test that passed, printed at the end of the run.

A pytest plugin (see `pytest_plugins` in tests/conftest.py): tests add rows through the
`fault_report` fixture once their checks held, and the table is printed in the terminal
summary, so CI logs show what was injected, what held and the figures measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass(frozen=True)
class Row:
    fault: str  # what was injected
    held: str  # what was checked, and held
    figures: str  # what was measured


@dataclass
class FaultReport:
    rows: list[Row] = field(default_factory=list)

    def add(self, fault: str, held: str, figures: str = "") -> None:
        self.rows.append(Row(fault, held, figures))

    def lines(self) -> list[str]:
        """A Markdown table: readable in a CI log, and pasted as is into README.md."""
        table = [("fault injected", "what held", "figures"), *((r.fault, r.held, r.figures) for r in self.rows)]
        widths = [max(len(row[i]) for row in table) for i in range(3)]
        cells = ["| " + " | ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)) + " |" for row in table]
        return [cells[0], "|" + "|".join("-" * (width + 2) for width in widths) + "|", *cells[1:]]


_report = FaultReport()


@pytest.fixture(scope="session")
def fault_report() -> FaultReport:
    return _report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _report.rows:
        terminalreporter.section("faults injected, and what held")
        for line in _report.lines():
            terminalreporter.write_line(line)
