"""Task-bank groups: one mixed batch over K ScaLearn targets, against one target alone and against
what users do without a bank.

Variants (the same batch, K targets spread uniformly: sequence b has task b mod K):

- ``single``: one target, the whole batch (the throughput a bank is held to);
- ``bank``: the task bank, every sequence with its own target (``scaled_adapter_sum_bank`` at the
  layer level, ``attach_task_bank`` with ``forward(task=...)`` at the model level);
- ``per_task`` (approach (a)): one call per task present on its sub-batch with that task's ω
  (model level: ω of every layer and the head copied into one ScaLearn model first);
- ``adapters_batchsplit`` (approach (b), model level only): the ``adapters`` library's
  ``BatchSplit`` over one ``seq_bn`` adapter per task present, the batch sorted by task (the
  closest thing it runs: it has no ScaLearn mixture, so each target is one bottleneck adapter,
  and its one head is shared).

Memory per added task (row fields): ``omega_bytes_per_task`` (ω of every layer) and, at the model
level, ``head_bytes_per_task`` (the task's head). Model: a RoBERTa-shaped classifier (random
weights from a config); targets: random ω and heads saved with ``save_scalearn`` (8 distinct
checkpoints reused round-robin: the timings do not depend on the values).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .flops import case_cost
from .harness import Candidate, GroupRun, info_candidate, run_case_group
from .matrix import SEQ, _BatchedCase
from .providers import ProviderUnavailable, adapters_installed, make_sources

TASK_COUNTS = (1, 8, 64, 1024)
LAYER_VARIANTS = ("single", "bank", "per_task")
MODEL_VARIANTS = ("single", "bank", "per_task", "adapters_batchsplit")
DISTINCT_CHECKPOINTS = 8


@dataclass(frozen=True)
class TaskBankCase(_BatchedCase):
    level: str  # "layer" or "model"
    layers: int  # 0 at the layer level
    d: int
    n: int
    k: int
    batch: int
    seq: int
    dtype: torch.dtype
    ID: ClassVar[str] = "{level}-L{layers}-d{d}-N{n}-K{k}-B{batch}xS{seq}"

    @property
    def r(self) -> int:
        return self.d // 16


def task_bank_cases(cuda: bool, quick: bool) -> list[TaskBankCase]:
    """The default layer shape (d 768, N 8, T 4096) and the suite's model shape, each for K in
    ``TASK_COUNTS``; a smoke matrix with ``quick``."""
    if quick:
        return [
            TaskBankCase(lvl, lay, 64, 2, 3, 4, 16, torch.float32)
            for lvl, lay in (("layer", 0), ("model", 1))
        ]
    dt = torch.bfloat16 if cuda else torch.float32
    model = (12, 32) if cuda else (2, 8)  # (layers, batch): the model cases of bench/matrix.py
    cases = [TaskBankCase("layer", 0, 768, 8, k, 32, SEQ, dt) for k in TASK_COUNTS]
    cases += [TaskBankCase("model", model[0], 768, 8, k, model[1], SEQ, dt) for k in TASK_COUNTS]
    return cases


def task_of_sequence(case: TaskBankCase) -> list[int]:
    return [b % case.k for b in range(case.batch)]


# ------------------------------------------------------------------ layer level


def _layer_steps(case: TaskBankCase, device: torch.device) -> dict[str, Callable[[], Any]]:
    from ..ops import pack_sources, scaled_adapter_sum_bank_packed, scaled_adapter_sum_packed

    src = make_sources(case.n, case.d, case.r, dtype=case.dtype, device=device)
    packed = pack_sources(src.w_down, src.b_down, src.w_up, src.b_up)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(case.batch, case.seq, case.d, generator=gen).to(device=device, dtype=case.dtype)
    residual = torch.randn(z.shape, generator=gen).to(device=device, dtype=case.dtype)
    bank = (
        src.omega[None] + 0.1 * torch.randn(case.k, case.n, case.d, generator=gen).to(src.omega)
    ).contiguous()
    tasks = torch.tensor(task_of_sequence(case), device=device)
    present = sorted(set(tasks.tolist()))
    rows = {k: torch.nonzero(tasks == k).squeeze(1) for k in present}

    def single() -> torch.Tensor:
        return scaled_adapter_sum_packed(z, packed, bank[0], residual)

    def banked() -> torch.Tensor:
        return scaled_adapter_sum_bank_packed(z, packed, bank, tasks, residual)

    def per_task() -> torch.Tensor:
        out = torch.empty_like(z)
        for k in present:
            sel = rows[k]
            y = scaled_adapter_sum_packed(
                z.index_select(0, sel), packed, bank[k], residual.index_select(0, sel)
            )
            out.index_copy_(0, sel, y)
        return out

    steps = {"single": single, "bank": banked, "per_task": per_task}
    return {name: _no_grad(fn) for name, fn in steps.items()}


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def step() -> Any:
        with torch.no_grad():
            return fn()

    return step


# ------------------------------------------------------------------ model level


def _model(case: TaskBankCase, device: torch.device):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=50265, hidden_size=case.d, num_hidden_layers=case.layers, num_attention_heads=case.d // 64,
        intermediate_size=4 * case.d, max_position_embeddings=max(514, case.seq + 2), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2,
    )  # fmt: skip
    return RobertaForSequenceClassification(cfg).to(device=device, dtype=case.dtype).eval()


def _sources(model, case: TaskBankCase) -> dict[str, dict[Any, tuple]]:
    from ..models import ffn_sites

    per_site = {
        s.key: make_sources(case.n, case.d, case.r, dtype=case.dtype, device="cpu", seed=100 + i)
        for i, s in enumerate(ffn_sites(model))
    }
    return {
        f"src{j}": {key: (s.w_down[j], s.b_down[j], s.w_up[j], s.b_up[j]) for key, s in per_site.items()}
        for j in range(case.n)
    }


class ModelFixture:
    """What a model group's variants share: the sources, the checkpoints (written once into a
    temporary folder), the input ids and the task of each sequence."""

    def __init__(self, case: TaskBankCase, device: torch.device) -> None:
        from ..models import attach_scalearn, omega_parameters, save_scalearn

        self.case, self.device = case, device
        self.tmp = tempfile.TemporaryDirectory()
        model = _model(case, torch.device("cpu"))
        self.sources = _sources(model, case)
        attach_scalearn(model, self.sources, "scalearn")
        gen = torch.Generator().manual_seed(3)
        self.folders: list[Path] = []
        for i in range(min(case.k, DISTINCT_CHECKPOINTS)):
            with torch.no_grad():
                for omega in omega_parameters(model):
                    omega.copy_(2.0 / case.n + 0.1 * torch.randn(omega.shape, generator=gen))
                model.classifier.out_proj.weight.normal_(0, 0.1, generator=gen)
            self.folders.append(save_scalearn(model, Path(self.tmp.name) / f"t{i}"))
        self.ids = torch.randint(3, 1000, (case.batch, case.seq), generator=gen).to(device)
        self.task = task_of_sequence(case)

    def folder(self, k: int) -> Path:
        return self.folders[k % len(self.folders)]


def _model_step(fx: ModelFixture, variant: str) -> tuple[Callable[[], Any], dict[str, Any]]:
    from ..models import attach_task_bank, load_scalearn, scalearn_layers, task_bank_parameters

    case, device = fx.case, fx.device
    present = sorted(set(fx.task))
    rows = {k: torch.tensor([b for b, t in enumerate(fx.task) if t == k], device=device) for k in present}
    info: dict[str, Any] = {}
    if variant == "single":
        model = load_scalearn(_model(case, device), fx.folder(0), sources=fx.sources)
        return _no_grad(lambda: model(input_ids=fx.ids).logits), info
    if variant == "bank":
        names = {f"t{k}": fx.folder(k) for k in range(case.k)}
        model = attach_task_bank(_model(case, device), fx.sources, names)
        task = [f"t{k}" for k in fx.task]
        params = task_bank_parameters(model)
        heads = set(map(id, model.get_submodule("task_bank_heads").parameters()))
        info["omega_bytes_per_task"] = sum(p.nbytes for p in params if id(p) not in heads) / case.k
        info["head_bytes_per_task"] = sum(p.nbytes for p in params if id(p) in heads) / case.k
        return _no_grad(lambda: model(input_ids=fx.ids, task=task).logits), info
    if variant == "per_task":
        model = load_scalearn(_model(case, device), fx.folder(0), sources=fx.sources)
        layers = scalearn_layers(model)
        states = {}
        for k in present:  # what approach (a) swaps in per task: ω of every layer and the head
            m = load_scalearn(_model(case, device), fx.folder(k), sources=fx.sources)
            states[k] = ([x.omega.detach().clone() for x in scalearn_layers(m)],
                         {n: v.clone() for n, v in m.classifier.state_dict().items()})  # fmt: skip

        def loop() -> torch.Tensor:
            out = None
            for k in present:
                omegas, head = states[k]
                for layer, omega in zip(layers, omegas, strict=True):
                    layer.omega.copy_(omega)
                model.classifier.load_state_dict(head)
                logits = model(input_ids=fx.ids.index_select(0, rows[k])).logits
                out = logits.new_empty(case.batch, logits.shape[1]) if out is None else out
                out.index_copy_(0, rows[k], logits)
            return out

        return _no_grad(loop), info
    if variant == "adapters_batchsplit":
        if not adapters_installed():
            raise ProviderUnavailable("the adapters package is not installed (pip install adapters)")
        import adapters
        from adapters.composition import BatchSplit

        model = _model(case, device)
        adapters.init(model)
        names = [f"t{k}" for k in present]
        for name in names:
            model.add_adapter(name, config="seq_bn")
        model.to(device=device, dtype=case.dtype)
        model.set_active_adapters(BatchSplit(*names, batch_sizes=[len(rows[k]) for k in present]))
        ids = fx.ids.index_select(0, torch.cat([rows[k] for k in present]))  # sorted by task beforehand
        info["note"] = "the batch sorted by task outside the timing; one shared head"
        return _no_grad(lambda: model(input_ids=ids).logits), info
    raise ValueError(f"task-bank model variant must be one of {MODEL_VARIANTS}; got {variant!r}")


# ------------------------------------------------------------------ the group


def run_task_bank_case(run: GroupRun, case: TaskBankCase) -> dict[str, dict[str, Any]]:
    """Every variant of ``case`` in inference, timed interleaved (``harness.run_group``)."""
    params = {
        "kind": "task_bank",
        "mode": "infer",
        "case": case.id,
        "level": case.level,
        "layers": case.layers,
    }
    params.update(d=case.d, r=case.r, n=case.n, k=case.k, batch=case.batch, seq=case.seq, ffn=4 * case.d)
    cost = case_cost(case, params)
    if case.level == "layer":
        variants = list(LAYER_VARIANTS)
        steps = _layer_steps(case, run.device)
        omega_bytes = case.n * case.d * torch.finfo(case.dtype).bits // 8

        def candidate(name: str) -> Candidate:
            extra = {"omega_bytes_per_task": omega_bytes} if name == "bank" else {}
            return Candidate(name, lambda: (steps[name], 2), params=extra)

        return run_case_group(run, case, variants, candidate, params=params, cost=cost)
    fx = ModelFixture(case, run.device)

    def model_candidate(name: str) -> Candidate:
        return info_candidate(name, lambda: _model_step(fx, name))

    try:
        return run_case_group(run, case, list(MODEL_VARIANTS), model_candidate, params=params, cost=cost)
    finally:
        fx.tmp.cleanup()
