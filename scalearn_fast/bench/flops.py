"""FLOP and minimum-byte counts for each benchmarked op (DESIGN.md §2, §5).

Every provider of an op is charged the *same* nominal cost: the FLOPs of the collapsed
algorithm and the bytes any implementation must move at least (inputs read once, outputs
written once, weights read once). A provider that moves more (the naive loop's N [T, d]
outputs) shows up as a lower achieved GB/s and % of roofline, which is the point.

Notation: T tokens, d hidden, R = N·r total bottleneck width, e bytes per element.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """AdapterFusion ("dynamic"), counted by its exact rewrite (DESIGN.md §2).

    forward: the N adapters as two GEMMs (4TdR), q = Q·z (2Td²), Kᵀq (2Td²), scores through
    the up projections (2TdR), softmax weights folded into S (free in the up GEMM), V after the
    weighted sum (2Td²): 6TdR + 6Td². The library's own loop does 2(N+1)·2Td² more (K and V on
    every adapter output); that extra work is what the faster providers save.
    backward (fusion weights Q, K, V and z train): charged 2x forward, the usual rule.
    bytes: z, residual, out (3Td), Q, K, V (3d²), D, U (2dR); backward doubles.
    """
    t, big_r = tokens, n * r
    flops = 6 * t * d * big_r + 6 * t * d * d
    elems = 3 * t * d + 3 * d * d + 2 * d * big_r
    if backward:
        flops *= 3
        elems *= 2
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
