"""``scalearn-fast train-task-bank``: stage 2 for several GLUE targets in one run, one task bank
with mixed batches (``scalearn_fast.train.task_bank``). Options as ``train-scalearn``, with
``--task`` taking several targets."""

from __future__ import annotations

import argparse

HELP = "stage 2 for several targets in one run: one task bank, mixed batches"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import _scalearn_args

    _scalearn_args(p)
    task = p._option_string_actions["--task"]  # train-scalearn's option, made to take several targets
    task.nargs = "+"
    task.help = "GLUE target tasks, two or more: rte mrpc sts-b cola sst-2 qnli mnli (required)"


def run(a: argparse.Namespace) -> int:
    from .cli import _print_result, _train_kwargs
    from .train.task_bank import train_task_bank

    summary = train_task_bank(
        a.task, a.sources, a.output, variant=a.variant, backend=a.backend, omega_dropout=a.omega_dropout,
        **_train_kwargs(a),
    )  # fmt: skip
    _print_result(summary)
    return 0
