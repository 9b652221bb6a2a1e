"""AdapterFusion's differentiable fast path (backends ``torch``, ``triton``, ``auto``): no
``[N, T, d]`` tensor, gradients by autograd through the core op (docs/fusion.md, R1-R5).

Two routes, chosen per call:
- ``T <= R`` (or dropout together with ``residual_before``): the query and key GEMMs run on the
  tokens, the scores come through R3, and the softmax weights scale S's blocks inside the core op
  (R4: ``scaled_adapter_sum_packed(..., row_scale=p)``); W_v runs once after the sum (R1).
- ``T > R``: the folds of R5 are rebuilt differentiably on every call (~6·d²·R MACs) and replace
  the Q, K and V GEMMs (~6·T·d² MACs).
"""

from __future__ import annotations

import torch

from .fusion_args import FusionCall
from .fusion_math import block_row_sum, fold_weights, fusion_probs, fusion_scores
from .packing import PackedSources
from .reference import activation_fn
from .scaled_adapter_sum import scaled_adapter_sum_packed


def adapter_fusion_autograd(call: FusionCall) -> torch.Tensor:
    """AdapterFusion on the 2-D inputs of ``call``, by the route that costs less."""
    if call.z2.shape[0] > call.packed.total_rank and not (call.dropping and call.weights.residual_before):
        return fusion_weights_folded(call)
    return fusion_unfolded(call)


def fusion_unfolded(call: FusionCall) -> torch.Tensor:
    """R1-R4 with the query and key GEMMs on the tokens: u_t = W_kᵀ·q_t, the shift
    γ_t = q_t·b_k (+ u_t·ρ_t under ``residual_before``) only when dropout needs it."""
    z2, c2, rho2, packed, weights = call.z2, call.c2, call.rho2, call.packed, call.weights
    dropping, activation, backend = call.dropping, call.activation, call.backend
    q = weights.query(c2)
    u = q if weights.key_weight is None else q @ weights.key_weight
    scores, hidden, up = fusion_scores(z2, u, packed, weights.scaling, activation)
    shift = None
    if dropping:
        if weights.key_bias is not None:
            shift = q @ weights.key_bias
        if weights.residual_before:
            shift = (u * rho2).sum(-1) if shift is None else shift + (u * rho2).sum(-1)
    probs = fusion_probs(scores, weights, dropping, shift)
    omega = weights.scaling
    mix_residual = rho2 if weights.residual_before else None
    if backend == "torch" and not any(t.requires_grad for t in (probs, hidden, up, omega)):
        # nothing to differentiate: reuse the scores' S instead of recomputing it in the core op
        hidden.mul_(probs.index_select(1, packed.source_index))
        bias = probs @ (omega * packed.b_up)
        if mix_residual is not None:
            bias.add_(mix_residual)
        mixed = torch.addmm(bias, hidden, up.T)
    else:
        mixed = scaled_adapter_sum_packed(
            z2, packed, omega, mix_residual, activation=activation, backend=backend, row_scale=probs
        )
    if weights.value_weight is None:
        return mixed if weights.residual_before or rho2 is None else mixed + rho2
    if weights.residual_before or rho2 is None:
        return mixed @ weights.value_weight.T
    return torch.addmm(rho2, mixed, weights.value_weight.T)


def fusion_weights_folded(call: FusionCall) -> torch.Tensor:
    """R5 with gradients: the folds of ``fold_weights`` (in >= float32, then one cast), the
    scores from ``c·score_weight + score_bias``, and the value-projected sources mixed by the
    core op with ω = 1. Under dropout the shift γ_t = q_t·b_k folds too:
    ``c_t·(W_qᵀ·b_k) + b_q·b_k``."""
    z2, c2, rho2, packed, weights = call.z2, call.c2, call.rho2, call.packed, call.weights
    dropping, activation, backend = call.dropping, call.activation, call.backend
    r, dtype = packed.total_rank, z2.dtype
    acc = torch.promote_types(dtype, torch.float32)
    score_weight, score_bias, up, c = fold_weights(packed, weights, acc)
    scored = c2 @ score_weight.to(dtype)  # [T, R + N]: Π and the bias scores of every adapter
    if score_bias is not None:
        scored = scored + score_bias.to(dtype)
    hidden = activation_fn(activation, torch.addmm(packed.b_down, z2, packed.w_down.T))  # S
    scores = block_row_sum(hidden * scored[:, :r], packed) + scored[:, r:]
    shift = None
    if dropping and weights.key_bias is not None:
        kb = weights.key_bias.to(acc)
        qw = weights.query_weight
        shift = c2 @ (kb if qw is None else qw.to(acc).T @ kb).to(dtype)
        if weights.query_bias is not None:
            shift = shift + (weights.query_bias.to(acc) @ kb).to(dtype)
    probs = fusion_probs(scores, weights, dropping, shift)
    if rho2 is None:
        residual = None
    elif weights.residual_before:  # Σ p_i (a_i + ρ) = Σ p_i a_i + ρ, then W_v
        residual = weights.value(rho2)
    else:
        residual = rho2
    mixed = PackedSources(
        packed.w_down, packed.b_down, up.to(dtype), c.to(dtype), packed.source_index, packed.ranks
    )
    ones = torch.ones(packed.num_sources, 1, dtype=dtype, device=z2.device)
    return scaled_adapter_sum_packed(
        z2, mixed, ones, residual, activation=activation, backend=backend, row_scale=probs
    )
