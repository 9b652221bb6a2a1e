"""Host time a composition adds to a model, measured where compute is negligible.

On a GPU at the default shape the plain encoder is itself host-bound (docs/benchmarks.md), so
every microsecond of Python, dispatch and launch a patched layer adds shows up as model
overhead. This measures that host cost on any machine: a 12-layer RoBERTa-shaped encoder at a
tiny width (d=64, one sequence of 8 tokens), each variant's inference step timed with
``time.thread_time`` (CPU time of this thread: insensitive to other jobs' scheduling),
variants interleaved, best of many repeats. ``scalearn_fused`` and ``fusion_fused`` use the
native output site when it is built (``scalearn_fast/site_extension``); ``scalearn_python`` and
``fusion_python`` are the same models kept in Python.

    PYTHONPATH=. python scripts/host_overhead.py [--repeats 40] [--variants plain,aten_floor,...]

It prints the load average and the package it ran (``PYTHONPATH`` picks the tree): on a shared
machine compare trees in one session, alternating runs, and name the load with the figures.
"""

from __future__ import annotations

import argparse
import os
import time
import timeit

import torch

from scalearn_fast.bench.matrix import ModelCase
from scalearn_fast.bench.model import build_model, inference_step

VARIANTS = (
    "plain", "aten_floor", "scalearn_naive", "scalearn_python", "scalearn_fused",
    "fusion_aten_floor", "fusion_python", "fusion_fused",
)  # fmt: skip


class AtenFloor(torch.nn.Module):
    """The ScaLearn sub-layer with ω already applied, written as the bare ATen calls it needs
    (linear, add, LayerNorm, linear, relu, linear, add, LayerNorm) and nothing else: the floor
    any implementation's host time per layer can reach."""

    def __init__(self, output: torch.nn.Module, n: int, r: int) -> None:
        super().__init__()
        self.dense, self.dropout, ln = output.dense, output.dropout, output.LayerNorm
        d = ln.normalized_shape[0]
        self.ln = (ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        self.w_down, self.b_down = torch.randn(n * r, d) * 0.02, torch.zeros(n * r)
        self.up, self.bias = torch.randn(d, n * r) * 0.02, torch.zeros(d)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        # the FFN's output projection as its one ATen call (eval: the dropout is the identity),
        # as the patched sites run it
        pre = torch.nn.functional.linear(hidden_states, self.dense.weight, self.dense.bias) + input_tensor
        z = torch.layer_norm(pre, *self.ln)
        hidden = torch.nn.functional.linear(z, self.w_down, self.b_down).relu_()
        return torch.layer_norm(torch.nn.functional.linear(hidden, self.up, self.bias).add_(pre), *self.ln)


def aten_floor_model(case: ModelCase):
    m = build_model("plain", case, torch.device("cpu"))
    for layer in m.encoder.encoder.layer:
        layer.output = AtenFloor(layer.output, case.n, case.d // 16)  # the sources' r
    return m


class FusionAtenFloor(torch.nn.Module):
    """The AdapterFusion sub-layer on its inference fold (``ops/fusion_infer.py``) written as
    the bare ATen calls the fold needs (linear, add, LayerNorm, one GEMM for the bottleneck
    units and the scores, relu, the per-source dot, softmax, the scaling, one GEMM, LayerNorm)
    and nothing else: AdapterFusion's floor, as ``AtenFloor`` is ScaLearn's."""

    def __init__(self, output: torch.nn.Module, fold) -> None:
        super().__init__()
        self.dense, ln = output.dense, output.LayerNorm
        self.ln = (ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        self.weight, self.bias, self.value = fold.weight, fold.bias, fold.value
        self.n, self.b = fold.num_sources, fold.block

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        pre = torch.nn.functional.linear(hidden_states, self.dense.weight, self.dense.bias) + input_tensor
        flat = pre.view(-1, pre.shape[-1])
        t = flat.shape[0]
        z = torch.layer_norm(flat, *self.ln)
        hidden, scores_by = torch.addmm(self.bias, z, self.weight).view(t, 2, self.n, self.b).unbind(1)
        hidden = hidden.relu_()
        p = torch.softmax(torch.linalg.vecdot(hidden, scores_by), -1)
        mixed = hidden.mul_(p.unsqueeze(-1)).view(t, -1)
        return torch.layer_norm(torch.addmm(flat, mixed, self.value), *self.ln).view_as(pre)


def fusion_aten_floor_model(case: ModelCase):
    """The fused AdapterFusion model with each sub-layer replaced by ``FusionAtenFloor`` on that
    layer's own fold."""
    m = build_model("fusion_fused", case, torch.device("cpu"))
    for layer in m.encoder.encoder.layer:
        sublayer = next(s for s in layer.output.modules() if type(s).__name__ == "AdapterFusionLayer")
        with torch.no_grad():
            z = torch.zeros(1, case.d, dtype=case.dtype)
            fold = sublayer._eval_fold(z, z, None).fold
        layer.output = FusionAtenFloor(layer.output, fold)
    return m


def in_python(variant: str):
    """A fused model kept in Python: no native site (``SiteForward.allow_native = False``)."""

    def build(case: ModelCase):
        m = build_model(variant, case, torch.device("cpu"))
        for module in m.encoder.modules():
            forward = module.__dict__.get("forward")
            if type(forward).__name__ == "SiteForward":
                forward.allow_native = False
        return m

    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; plain always runs")
    args = ap.parse_args()
    variants = ["plain", *(v for v in args.variants.split(",") if v and v != "plain")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(1)
    case = ModelCase(layers=12, d=64, heads=2, ffn=256, n=8, batch=1, seq=8, dtype=torch.float32)
    ids = torch.randint(3, 1000, (case.batch, case.seq), generator=torch.Generator().manual_seed(0))
    steps = {}
    for variant in variants:
        builders = {
            "aten_floor": aten_floor_model,
            "fusion_aten_floor": fusion_aten_floor_model,
            "scalearn_python": in_python("scalearn_fused"),
            "fusion_python": in_python("fusion_fused"),
        }
        build = builders.get(variant)
        model = build(case) if build else build_model(variant, case, torch.device("cpu"))
        steps[variant] = inference_step(model, ids)
        for _ in range(10):
            steps[variant]()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(args.repeats):
        for variant, step in steps.items():
            best[variant] = min(best[variant], timeit.timeit(step, number=10, timer=time.thread_time) / 10)
    plain = best["plain"]
    import scalearn_fast

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"tree {os.path.dirname(os.path.dirname(scalearn_fast.__file__))}, load average {load}")
    print("| variant | host ms per step | overhead vs plain | added per layer |")
    print("|---|---|---|---|")
    for variant, seconds in best.items():
        added = (seconds - plain) / case.layers * 1e6
        print(f"| {variant} | {seconds * 1e3:.2f} | {100 * (seconds / plain - 1):+.0f}% | {added:+.0f} µs |")


if __name__ == "__main__":
    main()
