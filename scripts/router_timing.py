"""Routed composition at one shape: the forms of docs/routing.md timed against each other.

Sequence gates (softmax over N per sequence), fp32, forward (no grad) and forward+backward
(gradients of z and the router logits), median of the timed repeats after one warm-up:

- the loop as the `adapters` library runs it (each adapter on its own, weighted sum);
- output mode (the core op with ``row_scale``, torch backend);
- merge mode in the packed two-GEMM form (``merged_adapter_sum``, what token gates use);
- merge mode with the B merged adapters built (``merged_adapter_sum_per_sequence``).

    PYTHONPATH=. python scripts/router_timing.py [--threads 2] [--repeats 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scalearn_fast.ops.packing import pack_sources
from scalearn_fast.ops.routing import merged_adapter_sum, merged_adapter_sum_per_sequence
from scalearn_fast.ops.scaled_adapter_sum import scaled_adapter_sum_packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--rank", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    n, d, r, b, length = args.sources, args.hidden, args.rank, args.batch, args.length
    packed = pack_sources(
        torch.randn(n, r, d) * 0.05,
        torch.randn(n, r) * 0.05,
        torch.randn(n, d, r) * 0.05,
        torch.randn(n, d) * 0.05,
    )
    z = torch.randn(b, length, d, requires_grad=True)
    logits = torch.randn(b, n, requires_grad=True)
    ones = torch.ones(n, 1)

    def token_gates() -> torch.Tensor:
        return torch.softmax(logits, -1)[:, None, :].expand(b, length, n)

    def loop() -> torch.Tensor:
        g, out = token_gates(), torch.zeros_like(z)
        for i in range(n):
            lo, hi = i * r, (i + 1) * r
            hidden = torch.relu(z @ packed.w_down[lo:hi].T + packed.b_down[lo:hi])
            out = out + g[..., i : i + 1] * (hidden @ packed.w_up[:, lo:hi].T + packed.b_up[i])
        return out

    forms = {
        "loop (as adapters runs it)": loop,
        "output mode": lambda: scaled_adapter_sum_packed(
            z, packed, ones, row_scale=token_gates(), backend="torch"
        ),
        "merge, packed two GEMMs": lambda: merged_adapter_sum(z, packed, token_gates()),
        "merge, built per sequence": lambda: merged_adapter_sum_per_sequence(
            z, packed, torch.softmax(logits, -1)
        ),
    }
    print(f"N={n} d={d} r={r} batch={b} length={length} threads={args.threads} fp32")
    for name, fn in forms.items():
        fwd, both = [], []
        for _ in range(args.repeats + 1):
            t = time.perf_counter()
            with torch.no_grad():
                fn()
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            fn().sum().backward()
            both.append(time.perf_counter() - t)
            z.grad = logits.grad = None
        print(
            f"{name:28s} forward {statistics.median(fwd[1:]) * 1e3:8.1f} ms   "
            f"forward+backward {statistics.median(both[1:]) * 1e3:8.1f} ms"
        )


if __name__ == "__main__":
    main()
