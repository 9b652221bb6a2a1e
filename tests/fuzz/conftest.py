"""Prints the fuzz suite's counts (cases per suite and backend, by outcome) at the end of a run."""

from __future__ import annotations

from tests.fuzz.harness import COUNTS, summary_lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not COUNTS:
        return
    terminalreporter.section("scalearn_fast fuzz: cases by suite, backend and outcome")
    for line in summary_lines():
        terminalreporter.write_line(line)
