"""Where the time of a benchmark step goes on a GPU: host (Python, dispatch, launches) or device
(kernels). One device-tool call; prints a table and the top kernels / CPU ops per step.

    PYTHONPATH=. python scripts/gpu_profile.py [--tokens 4096 65536] [--no-model]

For each step: ``wall`` (back-to-back calls between two synchronisations, as the benchmark
times them), ``host`` (the same calls with no final sync: time to enqueue them), ``device`` (sum
of the kernel times in a torch.profiler trace, per call) and ``kernels`` (launches per call).
``wall`` close to ``host`` and well above ``device`` means the step is launch/Python bound.
Model variants are also measured replayed from a CUDA graph (``infer_graph``), where host time
is one launch per step. ``scripts/gpu_run.sh`` runs this as its third stage.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from scalearn_fast.bench.harness import layer_step
from scalearn_fast.bench.matrix import ModelCase
from scalearn_fast.bench.model import build_model, graph_inference_step, inference_step, train_step
from scalearn_fast.bench.providers import (
    FUSION_PROVIDERS,
    SCALEARN_PROVIDERS,
    ProviderUnavailable,
    make_sources,
)


def measure(name: str, fn: Callable[[], object], calls: int = 30, top: int = 0) -> None:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls
    n_prof = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n_prof):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(e.self_device_time_total for e in kernels) / n_prof
    launches = sum(e.count for e in kernels) / n_prof
    print(
        f"{name:<44} wall {wall * 1e3:8.3f} ms  host {host * 1e3:8.3f} ms  "
        f"device {device_us / 1e3:8.3f} ms  kernels/call {launches:6.1f}",
        flush=True,
    )
    if top:
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
            us = e.self_device_time_total / n_prof
            print(f"    gpu {us:9.1f} us x{e.count / n_prof:5.1f}  {e.key[:80]}")
        cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"    cpu {e.self_cpu_time_total / n_prof:9.1f} us x{e.count / n_prof:5.1f}  {e.key[:80]}")


def layers(tokens: list[int]) -> None:
    dev = torch.device("cuda")
    for t in tokens:
        src = make_sources(8, 768, 48, dtype=torch.bfloat16, device=dev)
        g = torch.Generator(device=dev).manual_seed(0)
        z = torch.randn(t, 768, device=dev, dtype=torch.bfloat16, generator=g)
        res = torch.randn(t, 768, device=dev, dtype=torch.bfloat16, generator=g)
        for family, registry, names in (
            ("scalearn", SCALEARN_PROVIDERS, ("naive", "torch", "triton", "auto")),
            ("fusion", FUSION_PROVIDERS, ("naive", "torch", "triton", "auto")),
        ):
            for prov in names:
                p = registry[prov](src)
                for mode in ("fwd", "fwdbwd"):
                    top = 6 if prov == "triton" and t == tokens[0] else 0
                    measure(f"{family} {prov} {mode} T{t}", layer_step(p, z, res, mode), top=top)
    from scalearn_fast.ops import path_choice

    print("path choices:", path_choice.choices(), flush=True)


def models() -> None:
    dev = torch.device("cuda")
    case = ModelCase(12, 768, 12, 3072, 8, 32, 128, torch.bfloat16)
    ids = torch.randint(0, 50000, (case.batch, case.seq), device=dev)
    labels = torch.randint(0, 2, (case.batch,), device=dev)
    for variant in ("plain", "scalearn_naive", "scalearn_fused", "fusion_fused"):
        m = build_model(variant, case, dev)
        top = 10 if variant in ("scalearn_fused", "fusion_fused") else 0
        measure(f"model {variant} infer", inference_step(m, ids), calls=10, top=top)
        try:  # the same step replayed from a CUDA graph: what is left once host time is gone
            measure(f"model {variant} infer_graph", graph_inference_step(m, ids), calls=10)
        except ProviderUnavailable as exc:
            print(f"model {variant} infer_graph: {exc}", flush=True)
        measure(f"model {variant} train", train_step(m, ids, labels), calls=5, top=top)
        del m
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 65536])
    ap.add_argument("--no-model", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    layers(args.tokens)
    if not args.no_model:
        models()


if __name__ == "__main__":
    main()
