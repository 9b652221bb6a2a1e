"""A LoRA mixture's per-token gates and its load-balancing loss (MoSLD).

Gates: ``p = softmax(logits)`` over the N experts, keep the top-k, renormalise over those k
(the same as a softmax over the k largest logits); zeros elsewhere, as a dense ``[..., N]``
tensor.

Balance loss (Switch Transformer's, extended to top-k):

    L_bal = N · Σ_n f_n · P_n,   f_n = (1 / (T·k)) · #{tokens whose top-k holds n},
                                 P_n = (1 / T) · Σ_t p_n(t)

over the T tokens of the call. ``Σ_n f_n = 1``; ``L_bal = 1`` for a perfectly balanced router,
``N`` when every token goes to the same k experts with all the probability. f is a count
(no gradient); the gradient reaches the router through P.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def check_top_k(top_k: int, num_experts: int) -> int:
    """``top_k`` checked against N: a ValueError naming it when it is not in [1, N]."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, num_experts={num_experts}]; got top_k={top_k!r}")
    return top_k


def topk_gates(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(gates, probs, chosen)`` for ``logits [..., N]``: the dense renormalised top-k gates,
    the full softmax (fp32 for half-precision logits) and the 0/1 mask of the kept experts."""
    n = logits.shape[-1]
    check_top_k(top_k, n)
    probs = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
    if top_k == n:
        return probs.to(logits.dtype), probs, torch.ones_like(probs)
    top, idx = probs.topk(top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    chosen = torch.zeros_like(probs).scatter(-1, idx, 1.0)
    return gates.to(logits.dtype), probs, chosen


def balance_loss(probs: Tensor, chosen: Tensor, top_k: int) -> Tensor:
    """``N · Σ_n f_n · P_n`` over every token of ``probs [..., N]`` and ``chosen [..., N]``
    (a 0-dim tensor; 0 when there are no tokens)."""
    n = probs.shape[-1]
    p = probs.reshape(-1, n)
    if p.shape[0] == 0:
        return p.sum()
    f = chosen.reshape(-1, n).mean(0) / top_k
    return n * (f * p.mean(0)).sum()
