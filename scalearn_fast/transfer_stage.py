"""The run of a transfer stage (``train-scalearn``, ``train-fusion``): a new target task trained
over frozen source adapters, with the shared training options of ``scalearn_fast.cli``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def run_transfer_stage(
    a: argparse.Namespace,
    recipe: str,
    train: Callable[..., dict[str, Any]],
    train_kwargs: Callable[[argparse.Namespace], dict[str, Any]],
    print_result: Callable[[dict[str, Any]], None],
    **options: Any,
) -> int:
    """Apply ``recipe``'s defaults to ``a``, then train ``a.task`` over ``a.sources`` (with
    ``--include-target``) into ``a.output`` by ``train``, with the stage's own ``options`` and the
    shared ones ``train_kwargs(a)``; print the result and return the exit status (0)."""
    from .train.protocol import apply_recipe, with_target

    apply_recipe(a, recipe)
    sources = with_target(a.task, a.sources, a.include_target)
    print_result(train(a.task, sources, a.output, **options, **train_kwargs(a)))
    return 0
