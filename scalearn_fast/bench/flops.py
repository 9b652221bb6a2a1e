"""FLOP and minimum-byte counts for each benchmarked op (docs/design.md).

Every provider of an op is charged the *same* nominal cost: the FLOPs of the collapsed
algorithm and the bytes any implementation must move at least (inputs read once, outputs
written once, weights read once). A provider that moves more (the naive loop's N [T, d]
outputs) shows up as a lower achieved GB/s and % of roofline, which is the point.

Notation: T tokens, d hidden, R = N·r total bottleneck width, e bytes per element.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OpCost:
    flops: float
    min_bytes: float

    def roofline_time(self, peak_tflops: float, bw_tbps: float) -> float:
        """max(FLOPs/peak, bytes/bandwidth) in seconds; 0 when the peaks are unknown."""
        if peak_tflops <= 0 or bw_tbps <= 0:
            return 0.0
        return max(self.flops / (peak_tflops * 1e12), self.min_bytes / (bw_tbps * 1e12))

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte."""
        return self.flops / self.min_bytes if self.min_bytes else 0.0


def scalearn_cost(tokens: int, d: int, r: int, n: int, *, elem_bytes: int, backward: bool) -> OpCost:
    """ScaLearn composition ``Σ ω_i ⊙ A_i(z) + residual``.

    forward: S = relu(z·Dᵀ + b) (2TdR + 2TR), S·Uᵀ (2TdR), + bias and residual (2Td).
    backward with frozen sources (ω and z train): dS = g·U (2TdR), relu' (TR), dz = dS·D
    (2TdR), M = Sᵀ·g (2TdR), dω reduction (2dR + 2Td).
    bytes, forward: read z and residual, write out (3Td), weights D, U (2dR), b_down (R),
    b_up and ω (2Nd). backward adds: read g and z, write dz (3Td), weights again (2dR),
    write dω (Nd).
    """
    t, big_r = tokens, n * r
    flops = 4 * t * d * big_r + 2 * t * big_r + 2 * t * d
    elems = 3 * t * d + 2 * d * big_r + big_r + 2 * n * d
    if backward:
        flops += 6 * t * d * big_r + t * big_r + 2 * d * big_r + 2 * t * d
        elems += 3 * t * d + 2 * d * big_r + n * d
    return OpCost(float(flops), float(elems * elem_bytes))


def fusion_cost(tokens: int, d: int, r: int, n: int, *, elem_bytes: int, backward: bool) -> OpCost:
    """AdapterFusion ("dynamic"), counted by the cheapest exact form (docs/fusion.md, R5).

    forward (inference, the fixed weights folded once): per token ``z·[Dᵀ | W_qᵀW_kX]``
    (d·(2R + N) MACs), the value-projected up GEMM (R·d) and the bias values (N·d):
    2T(3dR + 2Nd) FLOPs, plus ReLU, the block products and the scaling by p (3TR). The loop
    the library runs computes the same function with the Q, K and V GEMMs on every adapter
    output (about 2(2N + 1)·Td² more); that extra work is what the faster providers save, and
    shows as a lower % of roofline.
    forward+backward (the fusion weights and z train): the folds are rebuilt per call,
    W_qᵀ·(W_k·X), W_v·U and C·W_vᵀ: 2d²(3R + 3N) FLOPs, so the forward is the per-token work
    plus that, and the whole step is charged 3x that forward (backward = 2x forward).
    bytes: z, residual, out (3Td) and the folded weights (d·(3R + 2N) + 2R + N) in inference;
    with gradients Q, K, V (3d²) and D, U (2dR) instead, and the step doubles them.
    """
    t, big_r = tokens, n * r
    if not backward:
        flops = 2 * t * (3 * d * big_r + 2 * n * d) + 3 * t * big_r
        elems = 3 * t * d + d * (3 * big_r + 2 * n) + 2 * big_r + n
    else:
        flops = 3 * (2 * t * (3 * d * big_r + 2 * n * d) + 3 * t * big_r + 2 * d * d * (3 * big_r + 3 * n))
        elems = 2 * (3 * t * d + 3 * d * d + 2 * d * big_r)
    return OpCost(float(flops), float(elems * elem_bytes))


def model_cost(
    tokens: int,
    seq_len: int,
    d: int,
    ffn: int,
    layers: int,
    *,
    elem_bytes: int,
    backward: bool,
    adapter: OpCost | None = None,
) -> OpCost:
    """A BERT/RoBERTa encoder stack: per layer and token, QKV + output projections (8d²), FFN
    (4·d·ffn), attention scores and weighted values (4·seq·d); plus ``adapter`` per layer.
    Training with frozen base weights is charged 2x forward for the activation gradients.
    Bytes: the weights once plus one [T, d] read and write per layer (a loose lower bound)."""
    per_layer = tokens * (8 * d * d + 4 * d * ffn + 4 * seq_len * d)
    elems = layers * (4 * d * d + 2 * d * ffn + 2 * tokens * d)
    flops = float(layers * per_layer) * (2 if backward else 1)
    total_bytes = float(elems * elem_bytes) * (2 if backward else 1)
    if adapter is not None:
        flops += layers * adapter.flops
        total_bytes += layers * adapter.min_bytes
    return OpCost(flops, total_bytes)


DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def row_cost(row: Mapping[str, Any]) -> OpCost | None:
    """The cost of one recorded benchmark (its ``extra_info``) by the counts above, so a report
    always uses today's counts; ``None`` for a row that lacks the fields."""
    try:
        kind, d, n, tokens = row["kind"], int(row["d"]), int(row["n"]), int(row["tokens"])
        elem = DTYPE_BYTES[row["dtype"]]
        train = row["mode"] in ("fwdbwd", "train")
        if kind in ("scalearn", "fusion"):
            cost = scalearn_cost if kind == "scalearn" else fusion_cost
            return cost(tokens, d, int(row["r"]), n, elem_bytes=elem, backward=train)
        if kind == "task_bank":  # every variant charged the single-target ScaLearn cost of its level
            r = d // 16
            adapter = scalearn_cost(tokens, d, r, n, elem_bytes=elem, backward=train)
            if row.get("level") == "layer":
                return adapter
            ffn, layers, seq = int(row.get("ffn") or 4 * d), int(row["layers"]), int(row["seq"])
            return model_cost(tokens, seq, d, ffn, layers, elem_bytes=elem, backward=train, adapter=adapter)
        if kind == "model":
            provider, r = str(row["provider"]), d // 16
            adapter = None
            if provider.startswith("scalearn"):
                adapter = scalearn_cost(tokens, d, r, n, elem_bytes=elem, backward=train)
            elif provider.startswith("fusion"):
                adapter = fusion_cost(tokens, d, r, n, elem_bytes=elem, backward=train)
            ffn = int(row.get("ffn") or 4 * d)  # RoBERTa's 4d when older rows did not record it
            layers, seq = int(row["layers"]), int(row["seq"])
            return model_cost(tokens, seq, d, ffn, layers, elem_bytes=elem, backward=train, adapter=adapter)
    except (KeyError, TypeError, ValueError):
        return None
    return None


def case_cost(case: Any, params: Mapping[str, Any]) -> Callable[[str], OpCost]:
    """A variant's cost (by name) for a row of ``case`` (its ``dtype`` and ``tokens``) recorded
    under ``params``: ``row_cost`` of that row, so the report recomputes the same figure."""
    dtype_name = str(case.dtype).removeprefix("torch.")

    def cost(variant: str) -> OpCost:
        found = row_cost({**params, "provider": variant, "dtype": dtype_name, "tokens": case.tokens})
        assert found is not None, params
        return found

    return cost
