"""The AdapterFusion oracle: the `adapters` library's loop, every adapter output, key and value
materialised (``[T, N, d]``), exactly as ``BertFusion`` computes them (docs/fusion.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fusion_args import FusionCall
from .reference import activation_fn


def adapter_fusion_reference(call: FusionCall) -> torch.Tensor:
    """Per token t, with c_t the query input (z_t by default) and ρ_t the residual:

    a_ti = s_i ⊙ (W_up_i·act(W_down_i·z_t + b_down_i) + b_up_i)
    e_ti = a_ti + ρ_t  if residual_before  else a_ti        (keys and values)
    σ_ti = (W_q·c_t + b_q)·(W_k·e_ti + b_k)
    p_t  = softmax_i(dropout(σ_t) / τ)                      (dropout in training only)
    out_t = Σ_i p_ti·W_v·e_ti  (+ ρ_t unless residual_before)
    """
    z2, c, rho, packed, weights = call.z2, call.c2, call.rho2, call.packed, call.weights
    entries = []  # e_ti for each adapter, [T, d]
    start = 0
    for i, r in enumerate(packed.ranks):
        pre = F.linear(z2, packed.w_down[start : start + r], packed.b_down[start : start + r])
        hidden = activation_fn(call.activation, pre)
        a_i = weights.scaling[i] * F.linear(hidden, packed.w_up[:, start : start + r], packed.b_up[i])
        start += r
        entries.append(a_i + rho if weights.residual_before else a_i)
    e = torch.stack(entries, dim=1)  # [T, N, d]
    q = weights.query(c)  # [T, d]
    k = weights.key(e)  # [T, N, d]
    v = weights.value(e)
    scores = torch.einsum("td,tnd->tn", q, k)
    scores = F.dropout(scores, weights.dropout_p, call.dropping)
    probs = torch.softmax(scores / weights.temperature, dim=-1)
    out = torch.einsum("tn,tnd->td", probs, v)
    if rho is not None and not weights.residual_before:
        out = out + rho
    return out
