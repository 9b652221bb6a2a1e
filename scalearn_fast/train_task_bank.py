"""``scalearn-fast train-task-bank``: stage 2 for several GLUE targets in one run, one task bank
with mixed batches (``scalearn_fast.train.task_bank``). Options as ``train-scalearn`` (``cli``
adds them), with ``--task`` taking several targets."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "stage 2 for several targets in one run: one task bank, mixed batches"


def several_targets(p: argparse.ArgumentParser) -> None:
    """Make train-scalearn's ``--task`` option (already on ``p``) take several targets."""
    task = p._option_string_actions["--task"]
    task.nargs = "+"
    task.help = "GLUE target tasks, two or more: rte mrpc sts-b cola sst-2 qnli mnli (required)"


def run(a: argparse.Namespace, train_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The run's results (``train.task_bank.train_task_bank``) from the parsed options."""
    from .train.task_bank import train_task_bank

    return train_task_bank(
        a.task, a.sources, a.output, variant=a.variant, backend=a.backend, omega_dropout=a.omega_dropout,
        **train_kwargs,
    )  # fmt: skip
