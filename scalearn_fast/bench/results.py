"""Where a run's rows go: a JSON file in pytest-benchmark's shape (``benchmarks`` with
``name``, ``group``, ``stats`` and ``extra_info``), rewritten after every group so that a run
stopped by a time limit keeps what it measured, plus the providers that did not run and why
(``skipped``). ``python -m scalearn_fast.bench report`` reads these files and pytest-benchmark's."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

FORMAT = "scalearn_fast.bench/2"


class ResultWriter:
    """Collects rows; ``path=None`` keeps them in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.benchmarks: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")

    def add(self, name: str, group: str, stats: dict[str, Any], extra_info: dict[str, Any]) -> None:
        self.benchmarks.append({"name": name, "group": group, "stats": stats, "extra_info": extra_info})
        self.flush()

    def skip(self, reason: str, **where: Any) -> None:
        """Record that ``where`` (kind, mode, case, provider) did not run, and why."""
        self.skipped.append({**where, "reason": reason})
        self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        doc = {
            "format": FORMAT,
            "datetime": self.started,
            "benchmarks": self.benchmarks,
            "skipped": self.skipped,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, self.path)
