"""``scalearn-fast train-fusion``: AdapterFusion (the paper's main baseline) + a fresh head over
the same frozen sources as ``train-scalearn``, on the same loop.

    scalearn-fast train-fusion --task rte --sources adapters/mnli adapters/qnli adapters/sst-2 \\
        --include-target adapters/rte --recipe paper --output out/rte-fusion

Writes the fusion as the `adapters` library's ``save_adapter_fusion`` folder (read back by
``attach_fusion(model, sources, folder)``), the head as ``task_head.safetensors`` and
``results.json``. Defaults: lr 5e-5 (the official ScaLearn code's
``src/scripts/fusion/run_fusion_glue.sh``), the "dynamic" fusion config.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def command(
    common_args: Callable[[argparse.ArgumentParser, float], None],
    include_target_arg: Callable[[argparse.ArgumentParser], None],
    train_kwargs: Callable[[argparse.Namespace], dict[str, Any]],
    print_result: Callable[[dict[str, Any]], None],
) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """``(add_arguments, run)`` of the subcommand, built on the CLI's shared training options
    (passed in by ``scalearn_fast.cli``, which registers it)."""

    def add_arguments(p: argparse.ArgumentParser) -> None:
        from .cli_options import add_backend_argument
        from .train.stages import FUSION_LR

        common_args(p, FUSION_LR)
        p.add_argument(
            "--sources", nargs="+", required=True, help="AdapterHub adapter folders (stage-1 outputs)"
        )
        p.add_argument(
            "--fusion-config", choices=("dynamic", "static"), default="dynamic", help="the library's config"
        )
        add_backend_argument(p)
        include_target_arg(p)

    def run(a: argparse.Namespace) -> int:
        from .train.stages import train_fusion
        from .transfer_stage import run_transfer_stage

        return run_transfer_stage(
            a, "train-fusion", train_fusion, train_kwargs, print_result,
            backend=a.backend, fusion_config=a.fusion_config,
        )  # fmt: skip

    return add_arguments, run
