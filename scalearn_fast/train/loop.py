"""The training loop both stages share: AdamW, linear schedule, eval per epoch (or every
``eval_every`` steps), early stopping on the task's main dev metric, best weights restored.
The task (a GLUE task or ``translation``) supplies its batches and dev metrics (``task_io``)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .data import Example, batches, task_spec
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


def log_line(message: str) -> None:
    """Print one log line without breaking a tqdm progress bar (``tqdm.write``; ``print`` without tqdm)."""
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
def evaluate(
    model: nn.Module,
    examples: Sequence[Example],
    tokenizer,
    task: str,
    *,
    batch_size: int = 64,
    max_length: int = 128,
) -> dict[str, float]:
    """The task's GLUE metrics on ``examples``."""
    spec = task_spec(task)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, labels = [], []
    for batch in batches(
        examples, tokenizer, batch_size=batch_size, max_length=max_length, regression=spec.is_regression
    ):
        labels.append(batch.pop("labels").numpy())
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        preds.append(
            logits.squeeze(-1).float().cpu().numpy()
            if spec.is_regression
            else logits.argmax(-1).cpu().numpy()
        )
    model.train(was_training)
    return compute_metrics(task, np.concatenate(preds), np.concatenate(labels))


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
) -> TrainResult:
    """Train ``params`` of ``model``; returns the best dev metrics (the best weights are kept).
    ``extra_loss()`` (e.g. AdapterFusion's value regularisation) is added to every step's loss;
    ``hooks`` replace the batches, loss and dev metrics of the single task ``cfg.task`` (by
    default those of ``task_io(cfg.task)``: a GLUE task or ``translation``).
    ``evaluate_fn(model)``, when given, replaces only the evaluation of ``dev``; it returns
    metrics with a ``main`` entry (higher is better)."""
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
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, total, int(cfg.warmup_ratio * total))
    if cfg.fp16 and device.type != "cuda":
        raise ValueError(f"fp16 training needs a CUDA device; the model is on {device}")
    scaler = torch.amp.GradScaler("cuda") if cfg.fp16 else None
    result = TrainResult(best={"main": -math.inf})
    best_state = [p.detach().clone() for p in params]
    bad_evals = 0
    start = time.perf_counter()
    progress = None
    if cfg.progress:
        try:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, desc=f"{cfg.task}", mininterval=5.0)
        except ImportError:
            progress = None
    model.train()
    step, epoch = 0, 0
    while step < total:
        for batch in hooks.batches(epoch):
            with torch.autocast(device.type, dtype=torch.float16, enabled=cfg.fp16):
                loss = hooks.loss(model, batch)
                extra = extra_loss() if extra_loss is not None else None
                if extra is not None:
                    loss = loss + extra
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if step % eval_every == 0 or step == total:
                metrics = hooks.evaluate()
                log(f"[{cfg.task}] step {step}/{total} loss {loss.item():.4f} dev {format_metrics(metrics)}")
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
                model.train()
            if step >= total or result.stopped_early:
                break
        epoch += 1
        if result.stopped_early:
            break
    if progress is not None:
        progress.close()
    with torch.no_grad():
        for p, best in zip(params, best_state, strict=True):
            p.copy_(best)
    result.steps = step
    result.seconds = time.perf_counter() - start
    return result
