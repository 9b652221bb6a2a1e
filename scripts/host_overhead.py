"""Host time a composition adds to a model, measured where compute is negligible.

On a GPU at the default shape the plain encoder is itself host-bound (docs/benchmarks.md), so
every microsecond of Python, dispatch and launch a patched layer adds shows up as model
overhead. This measures that host cost on any machine: a 12-layer RoBERTa-shaped encoder at a
tiny width (d=64, one sequence of 8 tokens), each variant's inference step timed with
``time.thread_time`` (CPU time of this thread: insensitive to other jobs' scheduling),
variants interleaved, best of many repeats.

    PYTHONPATH=. python scripts/host_overhead.py [--repeats 40]
"""

from __future__ import annotations

import argparse
import time
import timeit

import torch

from scalearn_fast.bench.matrix import ModelCase
from scalearn_fast.bench.model import build_model, inference_step

VARIANTS = ("plain", "scalearn_naive", "scalearn_fused", "fusion_fused")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    case = ModelCase(layers=12, d=64, heads=2, ffn=256, n=8, batch=1, seq=8, dtype=torch.float32)
    ids = torch.randint(3, 1000, (case.batch, case.seq), generator=torch.Generator().manual_seed(0))
    steps = {}
    for variant in VARIANTS:
        steps[variant] = inference_step(build_model(variant, case, torch.device("cpu")), ids)
        for _ in range(10):
            steps[variant]()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(args.repeats):
        for variant, step in steps.items():
            best[variant] = min(best[variant], timeit.timeit(step, number=10, timer=time.thread_time) / 10)
    plain = best["plain"]
    print("| variant | host ms per step | overhead vs plain | added per layer |")
    print("|---|---|---|---|")
    for variant, seconds in best.items():
        added = (seconds - plain) / case.layers * 1e6
        print(f"| {variant} | {seconds * 1e3:.2f} | {100 * (seconds / plain - 1):+.0f}% | {added:+.0f} µs |")


if __name__ == "__main__":
    main()
