"""The AdapterFusion algebra the fast paths share (docs/fusion.md, rewrites R2, R3 and R5).

Notation (docs/design.md, the two-GEMM layout): R = Σ r_i bottleneck units, S = act(z·Dᵀ + b_D)
``[T, R]``, U = [diag(s_1)·W_up_1 … diag(s_N)·W_up_N] ``[d, R]``, C_i = s_i ⊙ b_up_i ``[N, d]``,
so that the adapters' outputs are a_ti = U_i·S_ti + C_i. Per-source blocks of a ``[T, R]``
tensor are source i's r_i columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fusion_args import FusionWeights
from .packing import PackedSources
from .reference import activation_fn


def equal_rank(ranks: tuple[int, ...]) -> int | None:
    """The common r when every source has the same rank (a ``[T, R]`` tensor then views as
    ``[T, N, r]``), else ``None``. A plain function of ``ranks``: it traces under
    ``torch.compile(fullgraph=True)``."""
    first = ranks[0]
    return first if all(r == first for r in ranks) else None


def block_row_sum(values: torch.Tensor, packed: PackedSources) -> torch.Tensor:
    """``[T, R]`` -> ``[T, N]``: the sum of each source's r_i columns."""
    r = equal_rank(packed.ranks)
    if r is not None:
        return values.reshape(values.shape[0], packed.num_sources, r).sum(-1)
    return values.new_zeros(values.shape[0], packed.num_sources).index_add(1, packed.source_index, values)


def up_and_bias(
    packed: PackedSources, omega: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U [d, R], C [N, d])`` in ``dtype``: the up projections and biases scaled by ω."""
    omega = omega.to(dtype)
    up = packed.w_up.to(dtype) * omega.index_select(0, packed.source_index).T
    return up, omega * packed.b_up.to(dtype)


def fusion_scores(
    z: torch.Tensor, u: torch.Tensor, packed: PackedSources, omega: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R3: the scores up to a per-token shift, ``u_t·a_ti = Σ_k (u_t·U)[i,k]·S[t,i,k] + u_t·C_i``
    for all adapters at once, ``[T, N]``: one GEMM Π = u·U of width R, a block row-sum of S ⊙ Π
    and a ``[T, d] x [d, N]`` product (no ``[N, T, d]`` tensor). Also returns S and U."""
    hidden = activation_fn(activation, torch.addmm(packed.b_down, z, packed.w_down.T))  # S [T, R]
    up, bias = up_and_bias(packed, omega, z.dtype)
    scores = block_row_sum(hidden * (u @ up), packed) + u @ bias.T
    return scores, hidden, up


def fusion_probs(
    scores: torch.Tensor, weights: FusionWeights, dropping: bool, shift: torch.Tensor | None
) -> torch.Tensor:
    """R2: the softmax weights ``p = softmax(dropout(σ) / τ)`` from scores ``[T, N]`` known up to
    a per-token shift γ_t.

    Without score dropout softmax ignores γ, so it is left out; the key bias then has an
    exactly-zero gradient, which is returned explicitly (zeros, not ``None``). With dropout the
    mask multiplies each σ_ti separately and γ no longer cancels: ``shift`` (γ_t, ``[T]``, or
    ``None`` when it is zero) is added before the mask, so training stays exact."""
    if dropping:
        if shift is not None:
            scores = scores + shift[:, None]
        scores = F.dropout(scores, weights.dropout_p, True)
    elif weights.key_bias is not None and weights.key_bias.requires_grad and torch.is_grad_enabled():
        scores = scores + weights.key_bias.sum() * 0.0
    return torch.softmax(scores / weights.temperature, dim=-1)


def fold_weights(
    packed: PackedSources, weights: FusionWeights, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """R5's folds in dtype ``acc`` (differentiable). With X = [U | Cᵀ] ``[d, R + N]``:

        score_weight = W_qᵀ·W_k·X  [d, R + N]     score_bias = b_q·W_k·X  [R + N] (or None)
        up_value     = W_v·U       [d, R]         bias_value = C·W_vᵀ     [N, d]

    so that ``u_t·[a_t1 … a_tN] = c_t·score_weight + score_bias`` (split into Π and the bias
    scores) and ``W_v·Σ_i p_ti a_ti = (S_t ⊙ p_t[src])·up_valueᵀ + p_t·bias_value``. A missing
    query, key or value is the identity, a missing query bias zero."""
    up, c = up_and_bias(packed, weights.scaling, acc)
    x = torch.cat([up, c.T], 1)
    if weights.key_weight is not None:
        x = weights.key_weight.to(acc) @ x
    score_weight = x if weights.query_weight is None else weights.query_weight.to(acc).T @ x
    score_bias = None if weights.query_bias is None else weights.query_bias.to(acc) @ x
    if weights.value_weight is not None:
        value = weights.value_weight.to(acc)
        up, c = value @ up, c @ value.T
    return score_weight, score_bias, up, c
