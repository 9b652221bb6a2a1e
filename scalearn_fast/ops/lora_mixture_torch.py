"""The torch implementation of a LoRA mixture's "expand": everything after the shrink P = x·Aᵀ.

With T tokens, N experts of rank r and B_cat = [B_1 | ... | B_N] [d_out, N·r]:

    S    = [g_1·P_1, ..., g_N·P_N]            [T, N·r]  (P_n = P when the down matrix is shared)
    out  = scaling · S · B_catᵀ                one GEMM  [T, d_out]

and the backward, for ``grad_out [T, d_out]``:

    G    = grad_out · B_cat                    one GEMM  [T, N·r]   (block n: G_n = grad_out·B_n)
    dp   = scaling · Σ_n g_n·G_n   (shared)    or block n = scaling · g_n·G_n (per expert)
    dg_n = scaling · Σ_j G_n[:, j]·P_n[:, j]
    dB_n = scaling · (g_n·grad_out)ᵀ · P_n     one GEMM for all n: scaling · grad_outᵀ · S

S and G are temporaries of this call, never kept for the backward. The Triton kernels have the
same two functions with the same signatures (docs/lora_mixture.md); ``ops/lora_mixture.py``
picks one pair per backend.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _blocks(p: Tensor, gates: Tensor, r: int, shared: bool) -> Tensor:
    """``[T, N, r]`` view of P per expert (``P`` broadcast over N when shared)."""
    t, n = gates.shape
    return p.unsqueeze(1) if shared else p.view(t, n, r)


def _b_cat(b_up: Tensor) -> Tensor:
    """``[d_out, N·r]`` from ``b_up [N, d_out, r]`` (a copy of the small up weights)."""
    n, d_out, r = b_up.shape
    return b_up.permute(1, 0, 2).reshape(d_out, n * r)


def lora_mixture_expand(p: Tensor, gates: Tensor, b_up: Tensor, scaling: float, *, shared: bool) -> Tensor:
    """``scaling · S · B_catᵀ`` for ``p [T, r]`` (shared) or ``[T, N·r]``, ``gates [T, N]`` (dense,
    zeros outside the top-k) and ``b_up [N, d_out, r]``; ``out [T, d_out]`` in p's dtype."""
    n, _, r = b_up.shape
    s = (gates.unsqueeze(-1) * _blocks(p, gates, r, shared)).reshape(p.shape[0], n * r)
    return torch.mm(s, _b_cat(b_up).T).mul_(scaling)


def lora_mixture_expand_backward(
    p: Tensor,
    gates: Tensor,
    b_up: Tensor,
    grad_out: Tensor,
    scaling: float,
    *,
    shared: bool,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dp, dgates, db_up)`` of ``lora_mixture_expand`` for ``grad_out [T, d_out]``; an entry is
    None where ``needs`` (for p, gates, b_up) is False."""
    need_p, need_gates, need_b = needs
    n, d_out, r = b_up.shape
    t = p.shape[0]
    blocks = _blocks(p, gates, r, shared)
    dp = dgates = db_up = None
    if need_p or need_gates:
        g = torch.mm(grad_out, _b_cat(b_up)).view(t, n, r)  # G_n = grad_out · B_n
        if need_gates:
            dgates = (g * blocks).sum(-1).mul_(scaling)
        if need_p:
            if shared:
                dp = torch.bmm(gates.unsqueeze(1), g).squeeze(1).mul_(scaling)
            else:
                dp = (gates.unsqueeze(-1) * g).reshape(t, n * r).mul_(scaling)
    if need_b:
        s = (gates.unsqueeze(-1) * blocks).reshape(t, n * r)
        db_cat = torch.mm(grad_out.T, s).mul_(scaling)  # [d_out, N·r]
        db_up = db_cat.view(d_out, n, r).permute(1, 0, 2).contiguous()
    return dp, dgates, db_up
