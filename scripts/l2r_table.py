"""The L2R study's table (docs/routing.md) from the train-router runs of scripts/l2r_study.sh:
dev accuracy (%) on every seen task after each step, one row per (step, composition), and in
brackets how often the prediction fell among that task's own labels (task-id accuracy, %).

    python scripts/l2r_table.py runs/l2r_study

Reads ``<study>/<run>/results.json`` for the runs that finished, and each task's stage-1
adapter result (``<study>/adapters/<task>/results.json``: that task alone, with its own head
and the task id known) for reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = (
    ("router-output", "router (output)"),
    ("router-merge", "router (merge)"),
    ("last", "last adapter alone"),
    ("uniform", "uniform average (output)"),
)


def main(study: Path) -> None:
    runs = {name: json.loads((study / name / "results.json").read_text()) for name, _ in RUNS
            if (study / name / "results.json").is_file()}  # fmt: skip
    if not runs:
        raise SystemExit(f"no finished train-router run below {study}")
    tasks = next(iter(runs.values()))["tasks"]
    print("| after task | composition | " + " | ".join(t.upper() for t in tasks) + " | mean of seen |")
    print("|---|---|" + "---|" * len(tasks) + "---|")
    for step, task in enumerate(tasks):
        for name, label in RUNS:
            if name not in runs:
                continue
            row = runs[name]["accuracy_matrix"][step]
            seen = json.loads((study / name / f"step{step + 1}-{task}" / "results.json").read_text())["seen"]
            cells = [
                f"{100 * row[t]:.1f} ({100 * seen[t]['task_id_accuracy']:.0f})" if t in row else ""
                for t in tasks
            ]
            mean = sum(row.values()) / len(row)
            print(f"| {step + 1}: {task.upper()} | {label} | " + " | ".join(cells) + f" | {100 * mean:.1f} |")
    alone = []
    for t in tasks:
        path = study / "adapters" / t / "results.json"
        if path.is_file():
            alone.append(f"{t.upper()} {100 * json.loads(path.read_text())['best_dev']['accuracy']:.1f}")
    if alone:
        print("\nEach adapter with its own head and the task id (stage 1, accuracy %): " + ", ".join(alone))
    first = next(iter(runs.values()))
    print(f"\nDevice: {first['device']}; train+eval seconds per run: "
          + ", ".join(f"{n} {r['train_seconds']}" for n, r in runs.items()))  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/l2r_study"))
