"""The paper's protocol: the official runs' settings as named recipes, and the target task's own
adapter among the sources.

The official ScaLearn code (CPJKU/ScaLearn) trains with the Hugging Face Trainer:
``src/scripts/st-a/run_glue.sh`` (stage 1: lr 3e-4, patience 5), ``src/scripts/scalearn/
run_scalearn_glue.sh`` (ScaLearn: lr 6e-3, patience 30) and ``src/scripts/fusion/
run_fusion_glue.sh`` (AdapterFusion "dynamic": lr 5e-5, patience 5), each with 30 epochs, batch
32, sequence length 128, a linear schedule without warmup, evaluation and early stopping once
per epoch, and ``--fp16``. Its ``src/training/get_trainer.py`` loads all GLUE tasks' adapters
(``af_config_GLUE.json``, the target's included) and, for ScaLearn, moves the target's adapter
last.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..formats.adapterhub import AdapterSource, SourceSpec, load_adapterhub_sources
from .data import canonical_task

_COMMON = {"epochs": 30.0, "batch_size": 32, "max_length": 128, "eval_every": None, "warmup_ratio": 0.0}

# Per command: the values ``--recipe paper`` sets (an option given explicitly wins); fp16 is
# turned on where the run's device is a GPU.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "train-adapter": {**_COMMON, "lr": 3e-4, "patience": 5},
        "train-scalearn": {**_COMMON, "lr": 6e-3, "patience": 30},
        "train-fusion": {**_COMMON, "lr": 5e-5, "patience": 5},
    }
}


class Explicit(argparse.Action):
    """``store`` that also notes the option as given on the command line (``_explicit``), so a
    recipe leaves it alone."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None):
        setattr(namespace, self.dest, values)
        explicit = set(getattr(namespace, "_explicit", set()))
        explicit.add(self.dest)
        namespace._explicit = explicit


def apply_recipe(args: argparse.Namespace, command: str) -> argparse.Namespace:
    """Set ``args.recipe``'s values for ``command`` where the user gave none; fp16 on a GPU."""
    name = getattr(args, "recipe", None)
    if name is None:
        return args
    explicit = getattr(args, "_explicit", set())
    for key, value in RECIPES[name][command].items():
        if key not in explicit:
            setattr(args, key, value)
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    if str(device).startswith("cuda"):
        args.fp16 = True
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def with_target(
    task: str, sources: Sequence[SourceSpec], include_target: str | bool | None
) -> list[AdapterSource]:
    """The sources, read, with the target task's own adapter last.

    ``include_target``: a folder (the target's adapter, appended), True (the source named like
    the task, moved last) or None/False (the sources as given)."""
    srcs = load_adapterhub_sources(list(sources))
    if not include_target:
        return srcs
    target = canonical_task(task)
    if include_target is True:
        own = [s for s in srcs if s.name == target]
        if not own:
            raise ValueError(
                f"--include-target: no source is named {target!r} (sources: {[s.name for s in srcs]}); "
                "pass the target's adapter folder: --include-target FOLDER"
            )
        return [s for s in srcs if s.name != target] + own
    (own,) = load_adapterhub_sources([include_target])
    if own.name in [s.name for s in srcs]:
        raise ValueError(
            f"--include-target {include_target}: adapter {own.name!r} is already among the sources; "
            "use --include-target without a folder to move it last"
        )
    return [*srcs, own]
