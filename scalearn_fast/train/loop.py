"""The training loop every training command shares: AdamW, linear schedule, eval per epoch (or
every ``eval_every`` steps), early stopping on the task's main dev metric, best weights restored.
The task (a GLUE task or ``translation``) supplies its batches and dev metrics (``task_io``).

The loop runs on Hugging Face Accelerate (docs/training.md says why not the ``Trainer``): the
``Accelerator`` wraps the model in DDP under a launcher (``torchrun --nproc_per_node N``), runs
mixed precision (``fp16``, ``bf16``) and the experiment trackers (``report_to``). Batches and
evaluation are split across processes as ``train/distributed.py`` describes, so a run on N
processes takes the steps a single process takes with the same global batch."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .data import Example, batches, task_spec
from .distributed import all_mean, gather_predictions, is_main_process, launched, shard_rows
from .metrics import compute_metrics
from .translation import TaskIO, TranslationIO, is_translation


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainConfig:
    task: str
    lr: float
    epochs: float = 1.0
    batch_size: int = 32
    max_length: int = 128
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    patience: int = 3  # evaluations without improvement before stopping (0: never stop early)
    eval_every: int | None = None  # steps; None: once per epoch
    max_steps: int | None = None
    seed: int = 0
    progress: bool = True
    fp16: bool = False  # mixed precision (CUDA autocast to float16 with a gradient scaler)
    bf16: bool = False  # mixed precision (autocast to bfloat16; CUDA or CPU)
    gradient_checkpointing: bool = False  # recompute the model's layers in backward (HF models)
    # Accelerate trackers: tensorboard, wandb, mlflow, ... (none: off); a list, as results.json reads back
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0; got {self.lr}")
        if not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number; got {self.lr}")
        for name in ("epochs", "batch_size", "max_length", "eval_every", "max_steps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0; got {value}")
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 (0: no early stopping); got {self.patience}")
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 are two mixed-precision modes; pass at most one")
        self.report_to = list(self.report_to)
        if self.report_to:
            check_trackers(self.report_to)


def check_trackers(names: Sequence[str]) -> None:
    """Each of ``names`` is an Accelerate tracker installed here (``report_to``)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = sorted(str(t) for t in get_available_trackers())
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"report_to (--report-to): unknown tracker {name!r}; known: {sorted(LOGGER_TYPE_TO_CLASS)}"
            )
        if name not in available:
            raise ValueError(
                f"report_to (--report-to): the tracker {name!r} is not installed here (pip install {name}); "
                f"installed: {available or 'none'}"
            )


def log_line(message: str) -> None:
    """Print one log line without breaking a tqdm progress bar (``tqdm.write``; ``print`` without
    tqdm); only on the main process of a distributed run."""
    if not is_main_process():
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(message, flush=True)
    else:
        tqdm.write(message)


def format_metrics(metrics: dict[str, float]) -> str:
    """``accuracy 0.8125 f1 0.8333 main 0.8125``: each metric rounded to 4 decimals."""
    return " ".join(f"{name} {float(value):.4f}" for name, value in metrics.items())


@dataclass
class FitHooks:
    """What ``fit`` runs instead of its single-task defaults (several targets in one run): the
    training batches of an epoch, a batch's loss, and the dev metrics (with a ``main`` entry,
    the one early stopping watches)."""

    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    evaluate: Callable[[], dict[str, float]]


@dataclass
class TrainResult:
    best: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


@torch.no_grad()
def predict(
    model: nn.Module, examples: Sequence[Example], tokenizer, *, regression: bool, batch_size: int = 64,
    max_length: int = 128,
) -> np.ndarray:  # fmt: skip
    """Per example: the predicted class, or the first logit for a regression task."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for batch in batches(
        examples, tokenizer, batch_size=batch_size, max_length=max_length, regression=regression
    ):
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        preds.append(
            logits.squeeze(-1).float().cpu().numpy() if regression else logits.argmax(-1).cpu().numpy()
        )
    model.train(was_training)
    return np.concatenate(preds) if preds else np.zeros(0)


def evaluate(
    model: nn.Module,
    examples: Sequence[Example],
    tokenizer,
    task: str,
    *,
    batch_size: int = 64,
    max_length: int = 128,
) -> dict[str, float]:
    """The task's GLUE metrics on ``examples`` (split across the processes of a distributed run)."""
    regression = task_spec(task).is_regression

    def run(part: list[Example]) -> np.ndarray:
        return predict(
            model, part, tokenizer, regression=regression, batch_size=batch_size, max_length=max_length
        )

    preds = np.asarray(gather_predictions(run, examples))
    labels = np.asarray([e.label for e in examples], dtype=np.float32 if regression else np.int64)
    return compute_metrics(task, preds, labels)


class GlueIO:
    """GLUE tasks: tokenised (text_a, text_b) batches with labels, the task's GLUE metrics."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.regression = task_spec(task).is_regression

    def batches(self, examples, tokenizer, *, batch_size, max_length, shuffle, seed):
        return batches(
            examples, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=shuffle, seed=seed,
            regression=self.regression,
        )  # fmt: skip

    def evaluate(self, model, examples, tokenizer, *, max_length):
        return evaluate(model, examples, tokenizer, self.task, max_length=max_length)


def task_io(task: str) -> TaskIO:
    """The batches and dev metrics of ``task``: ``translation`` or a GLUE task."""
    return TranslationIO() if is_translation(task) else GlueIO(task)


def linear_schedule(
    optimizer: torch.optim.Optimizer, total: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_accelerator(
    device: torch.device, cfg: TrainConfig, logging_dir: str | os.PathLike[str] | None = None
):
    """The ``Accelerator`` of one ``fit``: ``cfg``'s mixed precision and trackers, DDP under a
    launcher (``find_unused_parameters``: a rank's rows may leave a target's parameters unused),
    the model left where it is (``device_placement=False``: ``--device`` placed it)."""
    from accelerate import Accelerator, DistributedType
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # Each fit may differ in precision; one process may also switch device kinds between runs.
    AcceleratorState._reset_state(reset_partial_state=not launched())
    precision = "fp16" if cfg.fp16 else "bf16" if cfg.bf16 else "no"
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=precision,
        device_placement=False,
        log_with=list(cfg.report_to) or None,
        project_dir=logging_dir if cfg.report_to else None,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    supported = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if accelerator.distributed_type not in supported:
        raise ValueError(
            f"the launcher asks for {accelerator.distributed_type}; training here runs on one process or "
            "DDP (MULTI_CPU, MULTI_GPU): the trained parameters are adapters, ω or a fusion, small enough to "
            "replicate, so sharding them (FSDP, DeepSpeed) buys nothing (docs/training.md)"
        )
    return accelerator


def fit(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    train: Sequence[Example],
    dev: Sequence[Example],
    tokenizer,
    cfg: TrainConfig,
    log: Callable[[str], None] = log_line,
    extra_loss: Callable[[], torch.Tensor | None] | None = None,
    hooks: FitHooks | None = None,
    evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    logging_dir: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train ``params`` of ``model``; returns the best dev metrics (the best weights are kept).
    ``extra_loss()`` (e.g. AdapterFusion's value regularisation) is added to every step's loss;
    ``hooks`` replace the batches, loss and dev metrics of the single task ``cfg.task`` (by
    default those of ``task_io(cfg.task)``: a GLUE task or ``translation``).
    ``evaluate_fn(model)``, when given, replaces only the evaluation of ``dev``; it returns
    metrics with a ``main`` entry (higher is better). ``logging_dir``: where file-based trackers
    of ``cfg.report_to`` write.

    Under a launcher every process calls ``fit`` with the same arguments: each takes its rows
    of every global batch of ``cfg.batch_size`` examples, DDP averages the gradients, and the
    dev metrics (equal on every rank) drive early stopping on all ranks alike."""
    device = next(model.parameters()).device
    if hooks is None:
        io = task_io(cfg.task)

        def default_batches(epoch: int) -> Iterable[dict[str, torch.Tensor]]:
            return io.batches(
                train, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, shuffle=True,
                seed=cfg.seed + epoch,
            )  # fmt: skip

        def default_evaluate() -> dict[str, float]:
            if evaluate_fn is not None:
                return evaluate_fn(model)
            return io.evaluate(model, dev, tokenizer, max_length=cfg.max_length)

        hooks = FitHooks(
            default_batches,
            lambda m, batch: m(**{k: v.to(device) for k, v in batch.items()}).loss,
            default_evaluate,
        )
    elif evaluate_fn is not None:
        raise ValueError("fit: pass evaluate_fn or hooks (whose evaluate it would replace), not both")
    set_seed(cfg.seed)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = math.ceil(steps_per_epoch * cfg.epochs)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    eval_every = cfg.eval_every or steps_per_epoch
    if cfg.fp16 and device.type != "cuda":
        raise ValueError(f"fp16 training needs a CUDA device; the model is on {device}")
    if cfg.gradient_checkpointing:
        checkpointing(model, True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, total, int(cfg.warmup_ratio * total))
    accelerator = make_accelerator(device, cfg, logging_dir)
    rank, size = accelerator.process_index, accelerator.num_processes
    if not accelerator.is_main_process:
        log = _silent
    wrapped, optimizer = accelerator.prepare(model, optimizer)  # the scheduler counts global steps itself
    if cfg.report_to:
        accelerator.init_trackers(cfg.task.replace("+", "_"), config=_tracker_config(cfg))
    result = TrainResult(best={"main": -math.inf})
    best_state = [p.detach().clone() for p in params]
    bad_evals = 0
    start = time.perf_counter()
    progress = None
    if cfg.progress and accelerator.is_main_process:
        try:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, desc=f"{cfg.task}", mininterval=5.0)
        except ImportError:
            progress = None
    wrapped.train()
    step, epoch = 0, 0
    try:
        while step < total:
            for batch in hooks.batches(epoch):
                rows, weight = shard_rows(batch, rank, size)
                with accelerator.autocast():
                    loss = hooks.loss(wrapped, rows)
                    total_loss = loss * weight if size > 1 else loss
                    extra = extra_loss() if extra_loss is not None else None
                    if extra is not None:
                        total_loss = total_loss + extra
                accelerator.backward(total_loss)
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:  # fp16: an overflow skips the step
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if step % eval_every == 0 or step == total:
                    batch_loss = all_mean(loss.item(), weight)  # the global batch's mean loss
                    metrics = hooks.evaluate()
                    dev_line = format_metrics(metrics)
                    log(f"[{cfg.task}] step {step}/{total} loss {batch_loss:.4f} dev {dev_line}")
                    if cfg.report_to:
                        accelerator.log(
                            {"train/loss": batch_loss, **{f"dev/{k}": v for k, v in metrics.items()}},
                            step=step,
                        )
                    metrics["step"] = step
                    result.history.append(metrics)
                    if metrics["main"] > result.best["main"]:
                        result.best = metrics
                        best_state = [p.detach().clone() for p in params]
                        bad_evals = 0
                    else:
                        bad_evals += 1
                        if cfg.patience and bad_evals >= cfg.patience:
                            result.stopped_early = True
                    wrapped.train()
                if step >= total or result.stopped_early:
                    break
            epoch += 1
            if result.stopped_early:
                break
    finally:
        if progress is not None:
            progress.close()
        if cfg.report_to:
            accelerator.end_training()
        accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)  # the plain forward again
        if cfg.gradient_checkpointing:
            checkpointing(model, False)
    with torch.no_grad():
        for p, best in zip(params, best_state, strict=True):
            p.copy_(best)
    result.steps = step
    result.seconds = time.perf_counter() - start
    return result


def checkpointing(model: nn.Module, on: bool) -> None:
    """The model's own activation (gradient) checkpointing on or off: non-reentrant, so gradients
    reach the adapters although the embeddings are frozen. Transformers 5 names it
    ``activation_checkpointing_*`` (the ``gradient_checkpointing_*`` names are deprecated there)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if not hasattr(model, f"{prefix}_checkpointing_enable"):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} is not a Hugging Face model")
    if on:
        getattr(model, f"{prefix}_checkpointing_enable")(
            **{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}
        )
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


def _silent(message: str) -> None:
    """The log of a process other than the main one."""


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as trackers take hyperparameters (numbers, strings, booleans)."""
    return {k: (",".join(v) if isinstance(v, list) else v) for k, v in asdict(cfg).items() if v is not None}
