"""What a differentiable composition call keeps for its backward: the pre-activation P [T, R],
or nothing of size T·R (P is recomputed from z in the backward). One rule, read by
``ops/dispatch.py`` for every backend (docs/design.md, "Saved state: P or its recomputation").

Cost model. Keeping P costs T·R elements until the backward. Recomputing it costs one GEMM,
P = z·Dᵀ + b_D, of T·d·R multiply-adds, and z [T, d] is kept either way (dD = dPᵀ·z needs it,
and it is the layer's own input). Both scale with T·R, so the trade is set by R against d:

- R <= d: P is no larger than the input the layer keeps anyway; the backward's extra GEMM
  (one more of the five T·d·R GEMMs of a forward+backward, about +20% of the composition's
  time) buys less memory than the model's own activations per layer take. P is kept.
- R > d (large bottlenecks, e.g. translation adapters at r ≈ 1,000 per source): P dominates
  what the layer keeps (N·r per token against d), and grows with N·r. It is recomputed, so
  what the call keeps is O(T·d) whatever N and r are.

``RECOMPUTE_ABOVE`` moves the threshold (recompute when R > RECOMPUTE_ABOVE · d): 0 recomputes
always (tests exercise the recompute path at small sizes this way), ``math.inf`` never.
"""

from __future__ import annotations

RECOMPUTE_ABOVE: float = 1.0


def recompute_pre(num_units: int, hidden: int) -> bool:
    """Whether a call with R = ``num_units`` bottleneck units at width d = ``hidden`` recomputes
    P in its backward instead of keeping it (see the module docstring)."""
    return num_units > RECOMPUTE_ABOVE * hidden
