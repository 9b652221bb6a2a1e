"""Task banks: K ScaLearn targets in one mixed batch vs one target alone, vs one call per task
(approach (a)) and vs the adapters library's BatchSplit (approach (b)), at the layer and model
level for K in 1, 8, 64, 1024 (scalearn_fast/bench/task_bank.py); memory per added task."""

from __future__ import annotations

from scalearn_fast.bench.task_bank import run_task_bank_case


def test_task_bank(group_run, task_bank_case):
    run_task_bank_case(group_run, task_bank_case)
