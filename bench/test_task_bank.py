"""Task banks: K ScaLearn targets in one mixed batch vs one target alone, vs one call per task
(approach (a)) and vs the adapters library's BatchSplit (approach (b)), at the layer and model
level for K in 1, 8, 64, 1024 (scalearn_fast/bench/task_bank.py); memory per added task."""

from __future__ import annotations

from scalearn_fast.bench.task_bank import run_task_bank_case


def test_task_bank(writer, task_bank_case, device, record, quick, skip_provider):
    run_task_bank_case(
        writer, task_bank_case, device, record, quick, skip=lambda name: skip_provider(name, task_bank_case)
    )
