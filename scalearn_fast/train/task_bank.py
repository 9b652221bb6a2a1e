"""Stage 2 for several targets in one run: one task bank (``attach_task_bank``), mixed batches.

Every target gets its own ω (initialised as ``attach_scalearn`` does) and its own fresh head
with its own label count. The training examples of all targets are shuffled together, so a
batch mixes targets; its loss is the sum over the targets present of their mean loss (cross
entropy, or mean squared error for a regression task), so one step's gradient is the sum of what
each target's own sub-batch would give. Each target is evaluated with its own GLUE metric; early
stopping watches the mean of the targets' main metrics. The loop is ``loop.fit`` (its hooks).

Written: ``output_dir/<task>/`` a ``save_scalearn`` folder per target (``attach_task_bank`` and
``add_task`` load them), and ``output_dir/results.json`` with every target's metrics.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io import atomic_write_json, load_adapterhub_sources
from ..ops.backends import resolve_backend
from .data import Example, batch_order, canonical_task, task_spec
from .distributed import gather_predictions, is_main_process
from .loop import FitHooks, fit, set_seed
from .metrics import compute_metrics
from .options import RunOptions
from .output import RESULTS_FILE, staged_output
from .stages import STAGE2_LR, _summary, load_config, load_model

Tagged = tuple[int, Example]  # (target id, example)


def encode(
    examples: Sequence[Tagged], tokenizer, tasks: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """One batch of tagged examples (single sentences and pairs may mix): the tokenizer's tensors
    padded on the right (ids with the pad token, masks and segment ids with 0), ``labels`` (float:
    regression targets and class ids alike) and ``task`` (int64 ids)."""
    singles = [i for i, (_, e) in enumerate(examples) if e.text_b is None]
    pairs = [i for i, (_, e) in enumerate(examples) if e.text_b is not None]
    rows: list[dict[str, list[int]]] = [{} for _ in examples]
    for group, has_pair in ((singles, False), (pairs, True)):  # one tokenizer call per kind
        if not group:
            continue
        a = [examples[i][1].text_a for i in group]
        b = [examples[i][1].text_b for i in group] if has_pair else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        for j, i in enumerate(group):
            rows[i] = {key: values[j] for key, values in enc.items()}
    width = max(len(r["input_ids"]) for r in rows)
    pad = {"input_ids": tokenizer.pad_token_id or 0}
    enc = {
        key: torch.tensor([r[key] + [pad.get(key, 0)] * (width - len(r[key])) for r in rows])
        for key in rows[0]
    }
    enc["labels"] = torch.tensor([float(e.label) for _, e in examples])
    enc["task"] = torch.tensor([k for k, _ in examples], dtype=torch.int64)
    return enc


def mixed_batches(
    examples: Sequence[Tagged],
    tokenizer,
    tasks: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    seed: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Every target's examples shuffled together (seeded), ``batch_size`` at a time."""
    for rows in batch_order(len(examples), batch_size, shuffle=True, seed=seed):
        yield encode([examples[i] for i in rows], tokenizer, tasks, max_length)


def multi_task_loss(
    logits: torch.Tensor, labels: torch.Tensor, task: torch.Tensor, tasks: Sequence[str]
) -> torch.Tensor:
    """Σ over the targets present of their mean loss: cross entropy over a target's own label
    count (the bank pads logits with -inf past it), or MSE on the first logit for regression."""
    total = logits.new_zeros(())
    for k in torch.unique(task).tolist():
        rows = task == k
        spec = task_spec(tasks[k])
        if spec.is_regression:
            total = total + F.mse_loss(logits[rows, 0].float(), labels[rows].float())
        else:
            total = total + F.cross_entropy(logits[rows, : spec.num_labels].float(), labels[rows].long())
    return total


def evaluate_targets(
    model: nn.Module, dev: dict[str, list[Example]], tokenizer, tasks: Sequence[str], *, max_length: int,
    batch_size: int = 64,
) -> dict[str, float]:  # fmt: skip
    """Each target's GLUE metrics on its dev set (``<task>/<metric>``) and ``main``, the mean of
    the targets' main metrics (the examples split across the processes of a distributed run)."""
    metrics: dict[str, float] = {}
    for k, name in enumerate(tasks):
        preds = gather_predictions(
            lambda part, k=k: predict_target(model, part, tokenizer, tasks, k, max_length, batch_size),
            dev[name],
        )
        labels = np.asarray([float(e.label) for e in dev[name]], dtype=np.float32)
        for metric, value in compute_metrics(name, np.asarray(preds), labels).items():
            metrics[f"{name}/{metric}"] = float(value)
    metrics["main"] = float(np.mean([metrics[f"{name}/main"] for name in tasks]))
    return metrics


@torch.no_grad()
def predict_target(
    model: nn.Module, examples: Sequence[Example], tokenizer, tasks: Sequence[str], k: int, max_length: int,
    batch_size: int = 64,
) -> np.ndarray:  # fmt: skip
    """Target ``tasks[k]``'s prediction per example: its class, or the first logit (regression)."""
    spec = task_spec(tasks[k])
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = []
    tagged = [(k, e) for e in examples]
    for start in range(0, len(tagged), batch_size):
        batch = encode(tagged[start : start + batch_size], tokenizer, tasks, max_length)
        batch.pop("labels")
        task = batch.pop("task").to(device)
        logits = model(**{key: v.to(device) for key, v in batch.items()}, task=task).logits
        logits = logits[:, : spec.num_labels]
        preds.append(
            logits[:, 0].float().cpu().numpy() if spec.is_regression else logits.argmax(-1).cpu().numpy()
        )
    model.train(was_training)
    return np.concatenate(preds) if preds else np.zeros(0)


def _initial_checkpoints(
    tasks: Sequence[str], srcs: Any, folder: Path, model_dir: str | None, variant: str,
    omega_dropout: float | None, seed: int, device: str,
) -> dict[str, Path]:  # fmt: skip
    """Per target: ω as ``attach_scalearn`` initialises it and a fresh head with the target's label
    count, written as a ``save_scalearn`` folder under ``folder`` (what ``attach_task_bank`` reads)."""
    from ..models import attach_scalearn, save_scalearn

    out = {}
    for k, name in enumerate(tasks):
        set_seed(seed + k)
        model, _ = load_model(model_dir, name)
        generator = torch.Generator().manual_seed(seed + k)
        attach_scalearn(model, srcs, variant, omega_dropout=omega_dropout, generator=generator)
        out[name] = save_scalearn(model, folder / name, source_paths=[s.path for s in srcs])
    return out


def _write_target(
    bank_model: nn.Module, name: str, srcs: Any, out: Path, model_dir: str | None, variant: str,
    omega_dropout: float | None,
) -> Path:  # fmt: skip
    """Target ``name``'s trained ω and head as a single-task ``save_scalearn`` folder ``out/name``."""
    from ..models import attach_scalearn, save_scalearn, scalearn_layers, task_state
    from ..models.scalearn import attach_state

    omegas, head = task_state(bank_model, name)
    model, _ = load_model(model_dir, name)
    attach_scalearn(model, srcs, variant, omega_dropout=omega_dropout)
    with torch.no_grad():
        if attach_state(model).shared_omega is not None:
            attach_state(model).shared_omega.copy_(omegas[0])
        else:
            for layer, omega in zip(scalearn_layers(model), omegas, strict=True):
                layer.omega.copy_(omega)
        params = dict(model.named_parameters())
        for pname, value in head.items():
            params[pname].copy_(value)
    return save_scalearn(model, out / name, source_paths=[s.path for s in srcs])


def train_task_bank(
    targets: Sequence[str], sources: Sequence[str] | dict[str, str], output_dir: str | os.PathLike[str], *,
    variant: str = "scalearn", backend: str = "auto", omega_dropout: float | None = None, **options: Any,
) -> dict[str, Any]:  # fmt: skip
    """Stage 2 for ``targets`` (GLUE task names) over frozen ``sources`` in one run, mixed
    batches (see the module docstring); ``max_*_samples`` apply per target. ``options``: as
    ``train_scalearn``'s (``lr`` defaults to ``STAGE2_LR``). ``output_dir`` must be new or empty
    (``overwrite=True`` replaces a previous run's folder); it is written only when the run
    succeeds. Returns the results."""
    from ..models import attach_task_bank, task_bank_parameters

    tasks = [canonical_task(t) for t in targets]
    if not tasks:
        raise ValueError("targets: name at least one GLUE task")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"targets name a task twice: {list(targets)}")
    run, cfg = RunOptions.split("+".join(tasks), STAGE2_LR, options)
    run.glue_only("a task bank")
    device = run.check(output_dir)
    resolve_backend(backend, torch.device(device))  # a bad name fails before any work
    srcs = load_adapterhub_sources(sources)
    load_config(run.model_dir)
    with staged_output(output_dir, run.overwrite) as out, tempfile.TemporaryDirectory() as tmp:
        set_seed(cfg.seed)
        train: list[Tagged] = []
        dev: dict[str, list[Example]] = {}
        for k, name in enumerate(tasks):
            tr, dv = run.load_data(name, cfg.seed)
            train += [(k, e) for e in tr]
            dev[name] = dv
        initial = _initial_checkpoints(
            tasks, srcs, Path(tmp), run.model_dir, variant, omega_dropout, cfg.seed, device
        )
        model, tokenizer = load_model(run.model_dir, tasks[0])
        model.to(device)
        attach_task_bank(model, srcs, initial, backend=backend)
        params = task_bank_parameters(model)
        run.log(f"[{cfg.task}] data: {run.describe_data()}")
        sizes = ", ".join(f"{name} {sum(1 for k, _ in train if k == i)}" for i, name in enumerate(tasks))
        run.log(f"[{cfg.task}] stage 2 {variant}, one bank over {[s.name for s in srcs]}: train {sizes}")

        def loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            batch = {key: v.to(device) for key, v in batch.items()}
            labels, task = batch.pop("labels"), batch.pop("task")
            return multi_task_loss(m(**batch, task=task).logits, labels, task, tasks)

        hooks = FitHooks(
            lambda epoch: mixed_batches(
                train,
                tokenizer,
                tasks,
                batch_size=cfg.batch_size,
                max_length=cfg.max_length,
                seed=cfg.seed + epoch,
            ),
            loss,
            lambda: evaluate_targets(model, dev, tokenizer, tasks, max_length=cfg.max_length),
        )
        result = fit(
            model, params, train, [], tokenizer, cfg, log=run.log, hooks=hooks, logging_dir=out / "logs"
        )
        all_dev = [e for name in tasks for e in dev[name]]
        summary = _summary(f"{variant} (task bank)", tasks[0], run, train, all_dev, cfg, result, device)
        summary.update(task=cfg.task, targets=tasks, dev_majority_baseline=None)
        summary["sources"] = [s.name for s in srcs]
        summary["backend"] = backend
        if is_main_process():
            for name in tasks:
                _write_target(model, name, srcs, out, run.model_dir, variant, omega_dropout)
            atomic_write_json(out / RESULTS_FILE, summary)
    return summary
