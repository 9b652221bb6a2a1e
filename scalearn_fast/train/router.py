"""``scalearn-fast train-router``: L2R's router training over a task sequence (docs/routing.md).

The user names the tasks in order and, per task, the adapter folder ``train-adapter`` wrote
for it (an AdapterHub adapter plus ``task_head.safetensors``). After task t the routers of
``attach_router`` are trained over the adapters of tasks 1..t on a memory of ``memory``
training examples per seen task (sampled once per task with the seed), then evaluated on the
dev set of every seen task, with no task id at inference.

The classifier without a task id: one head over the union of the seen tasks' labels
(``sst-2:0, sst-2:1, qnli:entailment, ...``); a prediction counts only when it is the right
label of the right task. Its output rows start from each task's stage-1 head, the rest of the
head (BERT's pooler) from the mean of the stage-1 heads; it trains with the routers on the
memory. Each step starts fresh: new routers (zero, so softmax gates start uniform) and a new
union head; only the adapters and the memory carry over.

``composition`` picks what is trained on the memory: ``router`` (routers + head), ``uniform``
(all seen adapters with fixed equal weights, the head trains) or ``last`` (the newest adapter
alone, the head trains); the last two are the baselines of the study in docs/routing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..cli_options import add_backend_argument
from ..formats.adapterhub import load_adapterhub_sources
from ..io import atomic_write_json
from ..layers_router import check_router_options
from ..models.router import attach_router, router_parameters
from ..models.router_checkpoint import save_router
from ..ops.backends import resolve_backend
from .data import Example, canonical_task, majority_baseline, task_spec
from .distributed import gather_predictions, is_main_process
from .loop import fit, predict, set_seed
from .metrics import compute_metrics
from .options import RunOptions
from .output import RESULTS_FILE, staged_output
from .stages import HEAD_FILE, default_model_dir, device_name, head_parameters, load_config, load_model

COMPOSITIONS = ("router", "uniform", "last")
ROUTER_LR = 1e-3
STEP_FOLDER = "step{index}-{task}"
# (flag, choices, default, help) of train-router's options that pick one of a few values
CHOICE_OPTIONS = (
    ("--composition", COMPOSITIONS, "router", "router: train the routers (and head); uniform: equal fixed "
     "weights over the seen adapters; last: the newest adapter alone (the head trains in all three)"),
    ("--gate", ("softmax", "sigmoid", "topk"), "softmax", "router gate"),
    ("--granularity", ("token", "sequence"), "sequence",
     "a gate per token, or per sequence (from the mean over its real tokens)"),
    ("--mode", ("output", "merge"), "output", "weight the outputs or merge parameters"),
)  # fmt: skip
HELP = "L2R: routers over a task sequence's adapters, trained on a memory of each seen task"


def memory_sample(examples: Sequence[Any], task: str, memory: int, seed: int) -> list[Any]:
    """``memory`` examples of ``task`` drawn without replacement with a seed of their own (the
    same examples at every step of a sequence, whatever the task order)."""
    if memory > len(examples):
        raise ValueError(
            f"memory (--memory) {memory} is larger than the {len(examples)} training examples of {task}"
        )
    return random.Random(f"l2r-memory-{seed}-{task}").sample(list(examples), memory)


def union_labels(tasks: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """The union label names ``task:label`` and each task's offset into them."""
    names, offsets = [], {}
    for task in tasks:
        offsets[task] = len(names)
        names += [f"{task}:{label}" for label in task_spec(task).labels or ()]
    return names, offsets


def check_sequence(
    tasks: Sequence[str], adapters: Sequence[str | os.PathLike[str]], memory: int, composition: str
) -> list[str]:
    """The canonical task names; a ValueError / FileNotFoundError for what is wrong with the input."""
    if not tasks:
        raise ValueError("tasks (--tasks) is empty; name the tasks in the order they were learnt")
    names = [canonical_task(t) for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks (--tasks) {list(tasks)} name a task twice")
    for task in names:
        if task_spec(task).is_regression:
            raise ValueError(
                f"tasks (--tasks): {task} is a regression task; train-router composes classifiers"
            )
    if len(adapters) != len(names):
        raise ValueError(
            f"adapters (--adapters) has {len(adapters)} folders for {len(names)} tasks {names}; "
            "pass one train-adapter output folder per task, in the same order"
        )
    if not (isinstance(memory, int) and memory >= 1):
        raise ValueError(f"memory (--memory) must be an integer >= 1 (examples per seen task); got {memory}")
    if composition not in COMPOSITIONS:
        raise ValueError(f"composition must be one of {COMPOSITIONS}; got {composition!r}")
    for task, folder in zip(names, adapters, strict=True):
        path = Path(folder)
        if not path.is_dir():
            raise FileNotFoundError(f"adapter folder for {task} not found: {path} (a train-adapter --output)")
        if not (path / HEAD_FILE).is_file():
            raise FileNotFoundError(
                f"adapter folder for {task}: {path / HEAD_FILE} not found (a train-adapter --output has it)"
            )
    return names


def init_union_head(model, heads: Sequence[dict[str, Any]], tasks: Sequence[str], offsets: dict[str, int]):
    """Fill the union head of ``model`` from the stage-1 heads of ``tasks`` (``{name: tensor}``
    each): the label rows of each task's output layer go to its slice; parameters of the same
    shape in every head (the pooler) become their mean."""
    with torch.no_grad():
        for name, param in head_parameters(model):
            stored = []
            for task, head in zip(tasks, heads, strict=True):
                if name not in head:
                    raise ValueError(
                        f"the stage-1 head of {task} has no {name}; was it trained on this model?"
                    )
                stored.append(head[name].to(param.dtype))
            if all(t.shape == param.shape for t in stored):
                param.copy_(torch.stack(stored).mean(0))
                continue
            for task, tensor in zip(tasks, stored, strict=True):
                n = task_spec(task).num_labels
                if tensor.shape[0] != n or tensor.shape[1:] != param.shape[1:]:
                    raise ValueError(
                        f"the stage-1 head of {task} has {name} of shape {list(tensor.shape)}; the union "
                        f"head's is {list(param.shape)} ({n} rows expected): was it trained on this model?"
                    )
                param[offsets[task] : offsets[task] + n] = tensor


def predict_union(model, examples, tokenizer, *, max_length: int, batch_size: int = 64):
    """Arg-max union label per example (numpy; the examples split across the processes of a
    distributed run)."""

    def run(part):
        preds = predict(
            model, part, tokenizer, regression=False, batch_size=batch_size, max_length=max_length
        )
        return preds.astype(np.int64)

    return np.asarray(gather_predictions(run, examples), dtype=np.int64)


def task_metrics(task: str, union_preds, labels, offset: int) -> dict[str, float]:
    """``task``'s GLUE metrics of union predictions: a prediction outside the task's labels is
    counted as a wrong label of the task; ``task_id_accuracy`` is how often the prediction
    fell among the task's labels."""
    n = task_spec(task).num_labels
    labels = np.asarray(labels)
    local = np.asarray(union_preds) - offset
    inside = (local >= 0) & (local < n)
    local = np.where(inside, local, (labels + 1) % n)
    out = compute_metrics(task, local, labels)
    out["task_id_accuracy"] = float(inside.mean()) if inside.size else float("nan")
    return out


def step_parameters(model: nn.Module, *, train_routers: bool) -> list[nn.Parameter]:
    """What a step trains: the head, and the routers when ``train_routers`` (else they are
    frozen at zero: uniform softmax gates, or the one source of ``last``)."""
    routers = router_parameters(model)
    for p in routers:
        p.requires_grad_(train_routers)
    return [p for _, p in head_parameters(model)] + (routers if train_routers else [])


def union_accuracy(examples, tokenizer, max_length: int) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate_fn`` for ``fit``: the union-label accuracy on ``examples`` (the memory)."""
    labels = np.array([e.label for e in examples])

    def evaluate(model: nn.Module) -> dict[str, float]:
        acc = float((predict_union(model, examples, tokenizer, max_length=max_length) == labels).mean())
        return {"memory_accuracy": acc, "main": acc}

    return evaluate


def method_name(composition: str, mode: str) -> str:
    return "last-adapter" if composition == "last" else f"{composition}-{mode}"


def train_router(
    tasks: Sequence[str],
    adapters: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    memory: int,
    composition: str = "router",
    gate: str = "softmax",
    k: int | None = None,
    granularity: str = "sequence",
    mode: str = "output",
    backend: str = "auto",
    **options: Any,
) -> dict[str, Any]:
    """Train routers as L2R does over ``tasks`` (in order) with ``adapters`` (one train-adapter
    folder per task); writes ``output_dir/step{t}-{task}/`` per step (a ``save_router`` folder
    and its ``results.json``) and ``output_dir/results.json``, and returns the latter.

    ``memory``: training examples kept per seen task. ``gate``, ``k``, ``granularity``, ``mode``,
    ``backend`` are ``attach_router``'s (``k`` is capped at the number of adapters of a step).
    ``max_train_samples`` subsets each training set before the memory is drawn (pass the value
    the adapters were trained with to draw the memory from what they saw); the rest of
    ``options`` is ``train_adapter``'s (``lr`` defaults to ``ROUTER_LR``).
    ``output_dir`` is written only when the whole sequence succeeds."""
    from safetensors.torch import load_file

    run, cfg = RunOptions.split("", ROUTER_LR, options)
    run.glue_only("train-router")
    names = check_sequence(tasks, adapters, memory, composition)
    check_router_options(gate, k, granularity, mode, max(k or 1, 1))
    cfg = replace(cfg, task=names[0])
    device = run.check(output_dir)
    resolve_backend(backend, torch.device(device))
    folders = [str(Path(a).absolute()) for a in adapters]
    sources = [load_adapterhub_sources([f])[0] for f in folders]  # a bad folder fails before any work
    heads = [load_file(str(Path(f) / HEAD_FILE)) for f in folders]
    load_config(run.model_dir)
    method = method_name(composition, mode)
    log = run.log
    with staged_output(output_dir, run.overwrite) as out:
        set_seed(cfg.seed)
        splits = {t: run.load_data(t, cfg.seed) for t in names}
        memories = {t: memory_sample(splits[t][0], t, memory, cfg.seed) for t in names}
        log(f"[l2r] data: {run.describe_data()}; {method} over {names}, memory {memory} per task")
        steps: list[dict[str, Any]] = []
        for index, task in enumerate(names, start=1):
            seen = names[:index]
            labels, offsets = union_labels(seen)
            set_seed(cfg.seed)
            model, tokenizer = load_model(run.model_dir, seen[0], num_labels=len(labels))
            model.to(device)
            init_union_head(model, heads[:index], seen, offsets)
            used = sources[:index] if composition != "last" else [sources[index - 1]]
            step_k = None if k is None else min(k, len(used))
            attach_router(
                model, used, gate=gate, k=step_k, granularity=granularity, mode=mode, backend=backend
            )
            params = step_parameters(model, train_routers=composition == "router")
            mem = [Example(e.text_a, e.text_b, offsets[t] + int(e.label)) for t in seen for e in memories[t]]
            step_cfg = replace(cfg, task=task)
            memory_accuracy = union_accuracy(mem, tokenizer, step_cfg.max_length)

            log(
                f"[l2r] step {index}/{len(names)} ({task}): {method} over {[s.name for s in used]}, "
                f"{len(mem)} memory examples, {len(labels)} union labels, "
                f"{sum(p.numel() for p in params)} trainable"
            )
            folder = out / STEP_FOLDER.format(index=index, task=task)
            result = fit(
                model, params, mem, mem, tokenizer, step_cfg, log=log, evaluate_fn=memory_accuracy,
                logging_dir=folder / "logs",
            )  # fmt: skip
            per_task = {}
            for t in seen:
                dev = splits[t][1]
                preds = predict_union(model, dev, tokenizer, max_length=step_cfg.max_length)
                per_task[t] = task_metrics(t, preds, [int(e.label) for e in dev], offsets[t])
                log(f"[l2r] step {index} dev {t}: main {per_task[t]['main']:.4f} "
                    f"task-id {per_task[t]['task_id_accuracy']:.4f}")  # fmt: skip
            summary = {
                "method": method,
                "task": task,
                "step": index,
                "tasks": seen,
                "sources": [s.name for s in used],
                "labels": labels,
                "best_dev": per_task[task],
                "seen": per_task,
                "average_main": sum(m["main"] for m in per_task.values()) / len(per_task),
                "memory_per_task": memory,
                "train_examples": len(mem),
                "dev_examples": len(splits[task][1]),
                "dev_majority_baseline": majority_baseline(splits[task][1]),
                "memory_fit": result.best,
                "steps": result.steps,
                "train_seconds": round(result.seconds, 1),
                "options": {
                    "composition": composition,
                    "gate": gate,
                    "k": step_k,
                    "granularity": granularity,
                    "mode": mode,
                    "backend": backend,
                },  # fmt: skip
                "config": asdict(step_cfg),
                "model": run.model_dir or default_model_dir(),
                "device": device_name(device),
                "data": run.describe_data(),
                "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            if is_main_process():
                save_router(model, folder, source_paths=[s.path for s in used])
                atomic_write_json(folder / RESULTS_FILE, summary)
            steps.append(summary)
        final = steps[-1]
        total = {
            "method": method,
            "task": "+".join(names),
            "tasks": names,
            "best_dev": {"main": final["average_main"]},
            "matrix": [{t: s["seen"][t]["main"] for t in s["tasks"]} for s in steps],
            "accuracy_matrix": [{t: s["seen"][t].get("accuracy") for t in s["tasks"]} for s in steps],
            "average_main": [s["average_main"] for s in steps],
            "adapters": folders,
            "memory_per_task": memory,
            "train_examples": final["train_examples"],
            "steps": sum(s["steps"] for s in steps),
            "train_seconds": round(sum(s["train_seconds"] for s in steps), 1),
            "options": final["options"],
            "config": asdict(cfg),
            "model": final["model"],
            "device": final["device"],
            "data": final["data"],
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if is_main_process():
            atomic_write_json(out / RESULTS_FILE, total)
    return total


def add_arguments(
    p: argparse.ArgumentParser, common: Callable[[argparse.ArgumentParser, float], None]
) -> None:
    """``train-router``'s options: ``common`` (the training options every stage has, with
    ``--task`` replaced by ``--tasks``) plus the sequence, memory and router options."""
    common(p, ROUTER_LR)
    group = p._optionals  # where the common options live: --tasks (several) takes --task's place there
    group.conflict_handler = "resolve"
    group.add_argument(
        "--tasks",
        "--task",
        nargs="+",
        required=True,
        help="the task sequence, in order (required)",
    )
    group.conflict_handler = "error"
    p.add_argument(
        "--adapters",
        nargs="+",
        required=True,
        help="one train-adapter --output folder per task, in the order of --tasks (required)",
    )
    p.add_argument("--memory", type=int, required=True, help="examples kept per seen task (required)")
    for flag, choices, default, what in CHOICE_OPTIONS:
        p.add_argument(flag, choices=choices, default=default, help=what)
    p.add_argument("--k", type=int, default=None, help="sources kept by --gate topk (capped at the step's N)")
    add_backend_argument(p)


def run(a: argparse.Namespace, train_kwargs: dict[str, Any]) -> int:
    summary = train_router(
        a.tasks,
        a.adapters,
        a.output,
        memory=a.memory,
        composition=a.composition,
        gate=a.gate,
        k=a.k,
        granularity=a.granularity,
        mode=a.mode,
        backend=a.backend,
        **train_kwargs,
    )
    if is_main_process():
        print(json.dumps({k: summary[k] for k in ("method", "task", "matrix", "train_seconds")}))
    return 0


def command(
    common: Callable[[argparse.ArgumentParser, float], None],
    train_kwargs: Callable[[argparse.Namespace], dict[str, Any]],
) -> tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """(help, add_arguments, run) for ``register_command``, given the CLI's shared training
    options (``common``) and how it turns them into keyword arguments (``train_kwargs``)."""
    return HELP, lambda p: add_arguments(p, common), lambda a: run(a, train_kwargs(a))
