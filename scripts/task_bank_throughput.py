"""Throughput of a task bank: one mixed batch over K ScaLearn targets vs one target alone, and vs
what users do today (approach (a): one forward per task's sub-batch, that task's ω and head
loaded into the model first).

A RoBERTa-shaped encoder with N random sources; K targets (``scalearn`` variant, random ω and
heads, saved with ``save_scalearn``) spread uniformly over the batch. Each step is timed with
``time.thread_time`` on one thread (CPU time of this thread: less sensitive to other jobs),
the three ways interleaved, best of ``--repeats``. Sequences per second = batch / step time.
Memory per task: the bank's ω and head Parameters divided by K (the heads dominate).

    PYTHONPATH=. python scripts/task_bank_throughput.py [--tasks 1 8 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers

from scalearn_fast import attach_scalearn, attach_task_bank, load_scalearn, save_scalearn
from scalearn_fast.models import ffn_sites, omega_parameters, scalearn_layers, task_bank_parameters


def build(args, num_labels: int = 2):
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(
        hidden_size=args.d, num_hidden_layers=args.layers, num_attention_heads=args.d // 64,
        intermediate_size=4 * args.d, vocab_size=1000, max_position_embeddings=args.seq + 4,
        num_labels=num_labels,
    )  # fmt: skip
    return transformers.RobertaForSequenceClassification(cfg).eval()


def sources(model, n: int, r: int):
    g = torch.Generator().manual_seed(1)
    d = model.config.hidden_size
    return {
        f"s{i}": {
            s.key: (
                torch.randn(r, d, generator=g) * 0.05,
                torch.zeros(r),
                torch.randn(d, r, generator=g) * 0.05,
                torch.zeros(d),
            )  # fmt: skip
            for s in ffn_sites(model)
        }
        for i in range(n)
    }


def save_tasks(args, srcs, k: int, root: Path) -> dict[str, Path]:
    folders = {}
    for i in range(k):
        model = attach_scalearn(build(args), srcs, "scalearn")
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for omega in omega_parameters(model):
                omega.copy_(torch.randn(omega.shape, generator=g) * 0.2 + 0.25)
            model.classifier.out_proj.weight.normal_(0, 0.1, generator=g)
        folders[f"t{i}"] = save_scalearn(model, root / f"t{i}")
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = build(args)
    srcs = sources(base, args.sources, args.rank)
    ids = torch.randint(3, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    print(f"d={args.d} layers={args.layers} N={args.sources} r={args.rank} batch={args.batch} seq={args.seq}")
    print("K | single-task seq/s | bank seq/s | loop (a) seq/s | bank/single | bank/(a) | memory per task")
    with tempfile.TemporaryDirectory() as tmp:
        folders = save_tasks(args, srcs, max(args.tasks), Path(tmp))
        for k in args.tasks:
            rate = measure(args, srcs, folders, ids, k)
            print(f"{k} | {rate['single']:.0f} | {rate['bank']:.0f} | {rate['loop']:.0f} | "
                  f"{rate['bank'] / rate['single']:.2f} | {rate['bank'] / rate['loop']:.2f} | "
                  f"{rate['bytes_per_task'] / 1024:.0f} KiB")  # fmt: skip


def measure(args, srcs, folders, ids, k: int) -> dict[str, float]:
    """Sequences per second of the three ways for K = ``k`` targets."""
    names = [f"t{i}" for i in range(k)]
    task = [names[b % k] for b in range(args.batch)]
    single = load_scalearn(build(args), folders["t0"], sources=srcs, backend="torch")
    bank = attach_task_bank(build(args), srcs, {n: folders[n] for n in names}, backend="torch")
    loop = load_scalearn(build(args), folders["t0"], sources=srcs, backend="torch")
    states = {}
    for n in names:  # what approach (a) swaps in per task: ω per layer and the head
        m = load_scalearn(build(args), folders[n], sources=srcs, backend="torch")
        states[n] = ([layer.omega.detach().clone() for layer in scalearn_layers(m)],
                     {key: v.clone() for key, v in m.classifier.state_dict().items()})  # fmt: skip
    rows = {n: [b for b, t in enumerate(task) if t == n] for n in names}

    def step_loop():
        for n in names:
            omegas, head = states[n]
            for layer, omega in zip(scalearn_layers(loop), omegas, strict=True):
                layer.omega.copy_(omega)
            loop.classifier.load_state_dict(head)
            loop(input_ids=ids[rows[n]])

    steps = {
        "single": lambda: single(input_ids=ids),
        "bank": lambda: bank(input_ids=ids, task=task),
        "loop": step_loop,
    }
    best = dict.fromkeys(steps, float("inf"))
    with torch.no_grad():
        for fn in steps.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in steps.items():
                t0 = time.thread_time()
                fn()
                best[name] = min(best[name], time.thread_time() - t0)
    rates = {name: args.batch / t for name, t in best.items()}
    per_task = sum(p.numel() * p.element_size() for p in task_bank_parameters(bank)) / k
    rates["bytes_per_task"] = per_task
    return rates


if __name__ == "__main__":
    main()
