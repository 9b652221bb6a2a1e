"""``attach_task_bank``: one model serving (or training) many ScaLearn target tasks at once.

Every ScaLearn target over the same N sources shares the frozen base model and the sources; only
its ω and its task head differ. A task bank loads K such targets (``save_scalearn`` folders) into
one model. Each sequence of a batch names its task, and one forward runs them all:

    attach_task_bank(model, sources, {"rte": "out/rte", "mrpc": "out/mrpc"})
    out = model(input_ids=ids, attention_mask=mask, task=["rte", "mrpc", "rte"])
    out.logits        # [B, max label count]; row b is task[b]'s head, padded with -inf

``task`` holds one entry per sequence: task names, ids (positions in ``task_names(model)``) or
an int64 tensor of ids. Every FFN site runs ``TaskBankLayer`` (the bank op: one down projection
for the whole batch). The head's ``nn.Linear`` modules (the pooler and the classifier, as
``head_parameters`` finds them) run each task's own weights on its sequences; the last one may
have a different label count per task. The model's own head is not used while the bank is on.

``add_task`` / ``remove_task`` change the bank at run time, without re-attaching. Training: ω of
every task and every task's head are Parameters (``task_bank_parameters``); a mixed batch trains
several targets at once, each task's ω dropped out in training with the probability its
checkpoint was trained with. Compute the loss from ``out.logits`` per task (``labels=`` is
refused: the model's own loss assumes one label count).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats.adapterhub import load_adapterhub_sources
from ..formats.keys import site_tag
from ..formats.scalearn import ScaLearnCheckpoint, read_scalearn_checkpoint
from ..layers import VARIANTS, default_omega_dropout
from ..layers_bank import GROUPS, TaskBankLayer, TaskRows
from .attach import (
    TASK_BANK,
    AttachRecord,
    attach,
    check_not_attached,
    check_sources_fit,
    detach,
    get_record,
    site_layer,
)
from .patching import original_forward, patch_forward, unpatch
from .registry import FFNSite, ffn_sites, hidden_size

HEADS = "task_bank_heads"  # the module holding every task's head, registered on the model


@dataclass
class TaskBankRecord(AttachRecord):
    """What ``attach_task_bank`` keeps on the model: the tasks in id order, each one's variant,
    the ω Parameters per group (per layer, or one shared by every layer for ``++``), the head's
    Linear modules and the bank row of each task id."""

    tasks: list[str] = field(default_factory=list)
    variants: dict[str, str] = field(default_factory=dict)
    dropout: dict[str, float] = field(default_factory=dict)  # task -> ω dropout probability
    omegas: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # task -> ω per layer (++: one)
    head_modules: list[str] = field(default_factory=list)
    output_module: str = ""
    head_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    rows: TaskRows = field(default_factory=TaskRows)
    task_ids: torch.Tensor | None = None  # the current batch's task id per sequence
    row_of: torch.Tensor | None = None  # task id -> bank row


def _record(model: nn.Module) -> TaskBankRecord:
    return get_record(model, TASK_BANK)  # type: ignore[return-value]


def task_names(model: nn.Module) -> list[str]:
    """The tasks of the bank; a task's id is its position here."""
    return list(_record(model).tasks)


def task_bank_layers(model: nn.Module) -> list[TaskBankLayer]:
    record = _record(model)
    return [getattr(site.module, record.attr) for site in record.sites]


def task_bank_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every task's ω (each group Parameter once) and every task's head."""
    seen: dict[int, nn.Parameter] = {}
    for layer in task_bank_layers(model):
        for group in GROUPS:
            p = layer.group(group)
            if p is not None:
                seen.setdefault(id(p), p)
    for p in model.get_submodule(HEADS).parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


def num_labels(model: nn.Module, task: str) -> int:
    """The label count of ``task``'s head."""
    record = _record(model)
    _check_known(record, task)
    return _task_head(model, task)[_key(record.output_module, "weight")].shape[0]


def task_state(model: nn.Module, task: str) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Task ``task``'s current (possibly trained) ω, one tensor per layer (one for the ``++``
    variants), and its head tensors by the model's parameter names: detached copies, e.g. to
    write a single-task ``save_scalearn`` checkpoint after a multi-target run."""
    record = _record(model)
    _check_known(record, task)
    _snapshot(model, record)
    head = _task_head(model, task)
    tensors = {name: head[name.replace(".", "__")].detach().clone() for name in record.head_shapes}
    return [o.clone() for o in record.omegas[task]], tensors


# ------------------------------------------------------------------ the head


def _key(module: str, param: str) -> str:
    return f"{module}.{param}".replace(".", "__")


def _task_head(model: nn.Module, task: str) -> nn.ParameterDict:
    return model.get_submodule(HEADS)[task]  # type: ignore[index]


def _head_layout(model: nn.Module) -> tuple[list[str], str, dict[str, tuple[int, ...]]]:
    """The head's Linear modules (in model order), the output one, and each head tensor's shape."""
    from .attach import head_parameters

    params = dict(head_parameters(model))
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no task head (a bare base model); a task bank needs one"
        )
    modules = []
    for name, module in model.named_modules():
        own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        if own and all(o in params for o in own):
            if type(module) is not nn.Linear:
                raise ValueError(
                    f"the task head's module {name!r} is a {type(module).__name__}; a task bank runs "
                    "heads made of nn.Linear modules (and parameter-free ones)"
                )
            modules.append(name)
    return modules, modules[-1], {n: tuple(p.shape) for n, p in params.items()}


class TaskHeadForward:
    """The patched forward of one head Linear: each task's weights on its own sequences; the
    output module pads every row to the bank's largest label count with -inf."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name

    @torch.compiler.disable  # per-task dispatch: nothing a compiled graph would specialise on
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        record = _record(self.model)
        ids = record.task_ids
        if ids is None:
            raise RuntimeError("a task-bank model runs with task=[...] (one task per sequence)")
        heads = self.model.get_submodule(HEADS)
        output = self.name == record.output_module
        wkey, bkey = _key(self.name, "weight"), _key(self.name, "bias")
        width = max(h[wkey].shape[0] for h in heads.values()) if output else None
        pieces, order = [], []
        for k in torch.unique(ids).tolist():
            head = heads[record.tasks[k]]
            sel = torch.nonzero(ids == k).squeeze(1)
            y = F.linear(x.index_select(0, sel), head[wkey], head[bkey] if bkey in head else None)
            if output and y.shape[-1] < width:
                y = F.pad(y, (0, width - y.shape[-1]), value=float("-inf"))
            pieces.append(y)
            order.append(sel)
        y = torch.cat(pieces)
        return y.index_select(0, torch.argsort(torch.cat(order)))


class TaskBankForward:
    """The model's patched forward: takes ``task=[...]``, one entry per sequence."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, task: Any = None, **kwargs: Any) -> Any:
        self._start(task, args, kwargs)
        try:
            return original_forward(self.model)(*args, **kwargs)
        finally:
            self._finish()

    @torch.compiler.disable  # task names and ids stay out of compiled graphs: no guard on them
    def _start(self, task: Any, args: tuple, kwargs: dict) -> None:
        """Check ``task`` and set the batch's task ids and bank rows for the layers and heads."""
        model = self.model
        record = _record(model)
        if task is None:
            raise ValueError(f"pass task=[...]: one of {record.tasks} (or its id) per sequence")
        if kwargs.get("labels") is not None:
            raise ValueError(
                "a task-bank model takes no labels=: tasks have their own label counts; compute each "
                "task's loss from out.logits"
            )
        ids = task_ids(model, task)
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if isinstance(inputs, torch.Tensor) and inputs.shape[0] != ids.shape[0]:
            raise ValueError(f"task names {ids.shape[0]} tasks for a batch of {inputs.shape[0]} sequences")
        device = next(model.parameters()).device
        record.task_ids = ids.to(device)
        record.rows.rows = record.row_of.to(device).index_select(0, record.task_ids)

    @torch.compiler.disable
    def _finish(self) -> None:
        record = _record(self.model)
        record.task_ids = None
        record.rows.rows = None


def _check_known(record: TaskBankRecord, task: str) -> None:
    if task not in record.tasks:
        raise ValueError(f"unknown task {task!r}; the bank holds {record.tasks}")


def task_ids(model: nn.Module, task: Any) -> torch.Tensor:
    """``task`` (names, ids or an int64 tensor, one per sequence) as an int64 tensor of ids."""
    record = _record(model)
    k = len(record.tasks)
    if isinstance(task, torch.Tensor):
        if task.dtype != torch.int64 or task.dim() != 1:
            raise ValueError(f"task as a tensor must be int64 [B]; got {task.dtype} {list(task.shape)}")
        ids = task
    else:
        if isinstance(task, str | int):
            raise ValueError("task must hold one entry per sequence (a list), not a single task")
        out = []
        for i, t in enumerate(task):
            if isinstance(t, str):
                if t not in record.tasks:
                    raise ValueError(f"task[{i}] is {t!r}, not a task of the bank {record.tasks}")
                out.append(record.tasks.index(t))
            elif isinstance(t, int) and not isinstance(t, bool):
                out.append(t)
            else:
                raise ValueError(f"task[{i}] is {t!r}: expected a task name or id")
        ids = torch.tensor(out, dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"task id {bad} is out of range: the bank holds {k} tasks (ids 0..{k - 1})")
    return ids


# ------------------------------------------------------------------ building the bank


def _read_task(
    model: nn.Module, record: TaskBankRecord, name: str, folder: Any
) -> tuple[str, list, dict, float]:
    """A task's variant, ω per layer (one for ``++``), head tensors and ω dropout, checked
    against the bank."""
    ckpt: ScaLearnCheckpoint = read_scalearn_checkpoint(folder)
    config, tensors, where = ckpt.config, ckpt.tensors, f"task {name!r} ({ckpt.folder})"
    d, n = hidden_size(model), len(record.source_names)
    if config["hidden_size"] != d:
        raise ValueError(f"{where}: hidden size d={config['hidden_size']}, the model has d={d}")
    if ckpt.sites != [s.key for s in record.sites]:
        raise ValueError(
            f"{where}: its layers {ckpt.sites} are not the model's {[s.key for s in record.sites]}"
        )
    if ckpt.source_names != list(record.source_names):
        raise ValueError(
            f"{where}: trained over N={len(ckpt.source_names)} sources {ckpt.source_names}, the bank "
            f"holds N={n} {list(record.source_names)} (same names, same order)"
        )
    variant = config["variant"]
    if variant not in VARIANTS:
        raise ValueError(f"{where}: unknown variant {variant!r}")
    width = 1 if variant.startswith("scalearn_uniform") else d
    keys = ["omega"] if variant.endswith("++") else [f"omega.{site_tag(s.key)}" for s in record.sites]
    omegas = []
    for key in keys:
        if key not in tensors:
            raise ValueError(f"{where}: lacks {key!r}")
        if tuple(tensors[key].shape) != (n, width):
            raise ValueError(
                f"{where}: {key} has shape {list(tensors[key].shape)}, expected [N={n}, {width}]"
            )
        omegas.append(tensors[key])
    saved = set(config.get("head") or [])
    if not saved:
        raise ValueError(
            f"{where}: holds no task head (saved with include_head=False); a bank task needs one"
        )
    if saved != set(record.head_shapes):
        raise ValueError(
            f"{where}: its head {sorted(saved)} does not match the model's head {sorted(record.head_shapes)}"
        )
    head = {}
    labels = tensors[f"head.{record.output_module}.weight"].shape[0]
    for pname, shape in record.head_shapes.items():
        t = tensors[f"head.{pname}"]
        expect = shape
        if pname.startswith(record.output_module + "."):
            expect = (labels, *shape[1:])
        if tuple(t.shape) != expect:
            raise ValueError(
                f"{where}: head tensor {pname} has shape {list(t.shape)}, expected {list(expect)}"
            )
        head[pname] = t
    dropout = config.get("omega_dropout")
    return variant, omegas, head, default_omega_dropout(variant) if dropout is None else float(dropout)


def _rebuild(model: nn.Module, record: TaskBankRecord) -> None:
    """Stack every task's ω into each layer's group Parameters and recompute the rows."""
    layers = task_bank_layers(model)
    param = next(iter(layers[0].parameters()))
    rows: dict[str, int] = {}
    groups_per_layer: list[dict[str, nn.Parameter]] = [{} for _ in layers]
    for group in GROUPS:
        members = [t for t in record.tasks if record.variants[t] == group]
        for t in members:
            rows[t] = len(rows)
        record.rows.dropout[group] = torch.tensor([record.dropout[t] for t in members])
        if not members:
            continue
        if group.endswith("++"):
            shared = nn.Parameter(torch.stack([record.omegas[t][0] for t in members]).to(param.device))
            for g in groups_per_layer:
                g[group] = shared
        else:
            for i, g in enumerate(groups_per_layer):
                g[group] = nn.Parameter(torch.stack([record.omegas[t][i] for t in members]).to(param.device))
    for layer, groups in zip(layers, groups_per_layer, strict=True):
        layer.set_groups(groups)
    record.row_of = torch.tensor([rows[t] for t in record.tasks], dtype=torch.int64)


def _snapshot(model: nn.Module, record: TaskBankRecord) -> None:
    """Copy the current (possibly trained) ω of every task back into ``record.omegas``."""
    layers = task_bank_layers(model)
    for group in GROUPS:
        members = [t for t in record.tasks if record.variants[t] == group]
        for j, t in enumerate(members):
            if group.endswith("++"):
                record.omegas[t] = [layers[0].group(group)[j].detach().clone()]
            else:
                record.omegas[t] = [layer.group(group)[j].detach().clone() for layer in layers]


def _register_task(
    model: nn.Module, record: TaskBankRecord, name: str, variant: str, omegas: Any, head: Any, dropout: float
) -> None:
    """Append task ``name`` to the record (its variant, ω dropout and ω Parameters) and its head to
    the model; the caller rebuilds the layers' banks."""
    record.tasks.append(name)
    record.variants[name] = variant
    record.dropout[name] = dropout
    record.omegas[name] = omegas
    _add_head(model, record, name, head)


def _add_head(model: nn.Module, record: TaskBankRecord, name: str, head: Mapping[str, torch.Tensor]) -> None:
    ref = dict(model.named_parameters())
    params = nn.ParameterDict()
    for pname, t in head.items():
        own = ref[pname]
        params[pname.replace(".", "__")] = nn.Parameter(t.to(dtype=own.dtype, device=own.device))
    model.get_submodule(HEADS)[name] = params


def add_task(model: nn.Module, name: str, folder: str | os.PathLike[str]) -> None:
    """Load one more target task (a ``save_scalearn`` folder with its head) into the bank."""
    record = _record(model)
    if name in record.tasks:
        raise ValueError(f"task {name!r} is already in the bank; remove_task it first")
    variant, omegas, head, dropout = _read_task(model, record, name, folder)
    _snapshot(model, record)
    _register_task(model, record, name, variant, omegas, head, dropout)
    _rebuild(model, record)


def remove_task(model: nn.Module, name: str) -> None:
    """Drop a task from the bank (its ω and head). The ids of later tasks shift down by one."""
    record = _record(model)
    _check_known(record, name)
    if len(record.tasks) == 1:
        raise ValueError(f"{name!r} is the bank's last task; detach_task_bank instead")
    _snapshot(model, record)
    record.tasks.remove(name)
    del record.variants[name], record.omegas[name], record.dropout[name]
    del model.get_submodule(HEADS)[name]
    _rebuild(model, record)


def attach_task_bank(
    model: nn.Module,
    sources: Any,
    tasks: Mapping[str, str | os.PathLike[str]],
    *,
    backend: str = "auto",
    freeze: bool = True,
) -> nn.Module:
    """Attach the N ``sources`` (as for ``attach_scalearn``) and the target ``tasks`` ({name:
    ``save_scalearn`` folder}, each trained over those sources, in that order, with its head) to
    ``model`` (a sequence classifier whose head is made of ``nn.Linear`` modules). Afterwards
    ``model(..., task=[one name or id per sequence])`` returns each sequence's logits from its
    own task's head (see the module docstring). With ``freeze`` only the tasks' ω and heads train.
    Any error leaves the model as it was."""
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("tasks must map task names to save_scalearn folders (at least one)")
    check_not_attached(model, TASK_BANK)
    srcs = load_adapterhub_sources(sources)
    sites = ffn_sites(model)
    d = hidden_size(model)
    activation = check_sources_fit(model, srcs, sites, d)
    modules, output, shapes = _head_layout(model)
    record = TaskBankRecord(
        TASK_BANK, [s.name for s in srcs], sites, backend, source_paths=[s.path for s in srcs],
        head_modules=modules, output_module=output, head_shapes=shapes,
    )  # fmt: skip
    read = {name: _read_task(model, record, name, folder) for name, folder in tasks.items()}
    param = next(model.parameters())

    def build(site: FFNSite) -> TaskBankLayer:
        return site_layer(
            TaskBankLayer, srcs, site, activation=activation, backend=backend, like=param,
            groups={}, task_rows=record.rows,
        )  # fmt: skip

    attach(model, record, build, lambda: [], freeze=freeze)
    try:
        model.add_module(HEADS, nn.ModuleDict())
        for name, (variant, omegas, head, dropout) in read.items():
            _register_task(model, record, name, variant, omegas, head, dropout)
        _rebuild(model, record)
        for name in modules:
            patch_forward(model.get_submodule(name), TaskHeadForward(model, name))
        patch_forward(model, TaskBankForward(model))
    except BaseException:
        detach_task_bank(model)
        raise
    if freeze:
        for n, p in model.named_parameters():
            if n in shapes:  # the model's own head: unused while the bank is on
                p.requires_grad_(False)
        for p in task_bank_parameters(model):
            p.requires_grad_(True)
    return model


def detach_task_bank(model: nn.Module) -> nn.Module:
    """Undo ``attach_task_bank``: original forwards and ``requires_grad`` flags come back."""
    record = _record(model)
    unpatch(model)
    for name in record.head_modules:
        unpatch(model.get_submodule(name))
    model._modules.pop(HEADS, None)
    detach(model, TASK_BANK)
    return model
