"""The suite's progress line: ``case i of n``, time so far and an estimate of the time left.

The estimate weighs each group by its nominal work (``group_weight``: the FLOPs of its shape,
a floor for the fixed costs of building and warming up providers) and scales the time the
finished groups took by the weight still ahead. It is a guide: compilation and autotuning
make the first groups of a run slower than their weight says.
"""

from __future__ import annotations

import time
from typing import Any

from .flops import fusion_cost, model_cost, scalearn_cost
from .matrix import LayerCase, ModelCase

_FLOOR = 5e9  # FLOPs-equivalent of building and warming up a group's providers


def group_weight(kind: str, case: Any, mode: str) -> float:
    """Nominal work of one group: its op's FLOPs times the providers that run it (the naive
    and library providers of AdapterFusion do several times the folded FLOPs)."""
    train = mode in ("fwdbwd", "train")
    if isinstance(case, ModelCase):
        per = model_cost(case.tokens, case.seq, case.d, case.ffn, case.layers, elem_bytes=2, backward=train)
        return 5 * per.flops + _FLOOR
    if isinstance(case, LayerCase):
        fn, factor = (fusion_cost, 20.0) if kind == "fusion" else (scalearn_cost, 6.0)
        cost = fn(case.tokens, case.d, case.r, case.n, elem_bytes=2, backward=train)
        return factor * cost.flops + _FLOOR
    return _FLOOR


def _fmt(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    m, s = divmod(seconds, 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Tracks which groups have finished; ``start`` returns the line to print."""

    def __init__(self, ids: list[str], weights: list[float], clock=time.perf_counter) -> None:
        if len(ids) != len(weights):
            raise ValueError(f"ids and weights must match; got {len(ids)} and {len(weights)}")
        self.index = {node: i for i, node in enumerate(ids)}
        self.weights = list(weights)
        self.done: set[int] = set()
        self.clock = clock
        self.t0 = clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def eta(self) -> float | None:
        """Seconds left by the finished groups' rate, or None before any has finished."""
        done_w = sum(self.weights[i] for i in self.done)
        if not self.done or done_w <= 0:
            return None
        left_w = sum(w for i, w in enumerate(self.weights) if i not in self.done)
        return self.elapsed() * left_w / done_w

    def start(self, node: str) -> str:
        i = self.index[node]
        eta = self.eta()
        est = "ETA after the first case" if eta is None else f"ETA ~{_fmt(eta)}"
        return f"[bench] case {i + 1} of {len(self.weights)}, {_fmt(self.elapsed())} so far, {est}: {node}"

    def finish(self, node: str) -> None:
        self.done.add(self.index[node])
