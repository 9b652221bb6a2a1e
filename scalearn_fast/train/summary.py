"""Compare training runs: every ``results.json`` below some folders as one markdown table.

``scalearn-fast summarize runs/`` prints it; docs/training.md's tables come from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .metrics import TASK_METRICS

RESULTS_FILE = "results.json"
_SHORT = {"accuracy": "acc", "f1": "F1", "matthews": "MCC", "pearson": "Pearson", "spearman": "Spearman"}


def collect_results(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The ``results.json`` of each path (a results file, a run folder, or a folder searched
    recursively), in path order then sorted by file path; raises ``FileNotFoundError`` for a
    path with none and ``ValueError`` naming a file that is not a run's results."""
    found: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.rglob(RESULTS_FILE))
        else:
            raise FileNotFoundError(f"{path} does not exist")
        if not files:
            raise FileNotFoundError(f"no {RESULTS_FILE} below {path}")
        for file in files:
            try:
                result = json.loads(file.read_text())
                result["best_dev"], result["task"], result["method"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{file} is not a training run's {RESULTS_FILE}: {exc!r}") from exc
            found.append({**result, "path": str(file)})
    return found


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def format_results_table(results: Iterable[dict[str, Any]]) -> str:
    """One markdown row per run: stage, method, task, sizes, steps, dev metrics (%), the dev
    majority-class accuracy, seconds, learning rate."""
    lines = [
        "| stage | method | task | train ex. | dev ex. | steps | best dev (%) | main | dev majority acc (%) "
        "| train+eval s | lr |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        task = r["task"]
        names, main = TASK_METRICS.get(task, ((), "main"))
        best = r["best_dev"]
        shown = " / ".join(f"{_SHORT.get(n, n)} {_pct(best.get(n))}" for n in names) or _pct(best.get("main"))
        stage = 1 if r["method"] == "adapter" else 2
        method = "adapter" if stage == 1 else r["method"]
        lr = r.get("config", {}).get("lr")
        cells = [
            stage,
            method,
            task.upper(),
            r.get("train_examples", "–"),
            r.get("dev_examples", "–"),
            r.get("steps", "–"),
            shown,
            f"{_SHORT.get(main, main)} {_pct(best.get('main'))}",
            _pct(r.get("dev_majority_baseline")),
            r.get("train_seconds", "–"),
            "–" if lr is None else lr,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
