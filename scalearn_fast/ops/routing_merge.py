"""The packed merge of ``ops/routing.py`` (per-row gates, equal ranks) with its backward written
out, for frozen sources: what a router trains (the gates, and z below it).

With rows z [T, d], gates g [T, N], the packed sources D [R, d], b_D [R], W [d, R], B [N, d]
(R = N·r) and act the activation:

    P   = z·Dᵀ + b_D                  [T, N, r]   one GEMM
    P̄   = Σ_i g_i P_i                 [T, r]      a batched (1 x N)·(N x r) product per row
    S_i = g_i act(P̄)                  [T, N, r]
    out = S·Wᵀ + g·B + residual        [T, d]      one GEMM (g·B and the residual accumulate
                                                   into its output)

Backward, with γ = dL/dout:

    dS   = γ·W                         [T, N, r]   one GEMM
    dP̄   = act'(P̄) ⊙ Σ_i g_i dS_i      [T, r]
    dg_i = dS_i·act(P̄) + P_i·dP̄ + γ·B_i
    dz   = (g ⊗ dP̄)·D                  one GEMM

Four T·d·R GEMMs and a few passes over [T, R], against autograd's recording of the same
forward (a copy of the scaled hidden units per row for the product's backward, separate
multiply-and-sum passes for each gradient). What is kept for the backward follows
``ops/saved_state.py``: P [T, R] when R <= d, else nothing of size T·R (P is recomputed).
Sources that require a gradient go through ``merged_rows_autograd`` (autograd's own form). A
backward that builds a graph (``create_graph=True``) recomputes P and P̄ from z and g, so that
it differentiates again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import saved_state
from .activations import activation_fn, activation_grad
from .packing import PackedSources

Tensor = torch.Tensor


def merged_rows(
    rows: Tensor, packed: PackedSources, g: Tensor, residual: Tensor | None, r: int, activation: str
) -> Tensor:
    """``out [T, d]`` for rows ``[T, d]``, gates ``g [T, N]`` and an optional residual ``[T, d]``
    (inputs already checked): the written-out backward when no source needs a gradient, else
    autograd's form."""
    weights = (packed.w_down, packed.b_down, packed.w_up, packed.b_up)
    if rows.shape[0] == 0:
        out = rows.new_zeros(rows.shape)
        return out if residual is None else out + residual
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return merged_rows_autograd(rows, packed, g, residual, r, activation)
    recompute = saved_state.recompute_pre(packed.total_rank, packed.hidden_size)
    return _MergedRows.apply(rows, g, *weights, residual, r, activation, recompute)


def merged_rows_autograd(
    rows: Tensor, packed: PackedSources, g: Tensor, residual: Tensor | None, r: int, activation: str
) -> Tensor:
    """The same sum as plain differentiable ops (gradients for the sources too)."""
    n = g.shape[1]
    pre = F.linear(rows, packed.w_down, packed.b_down).view(-1, n, r)  # [T, N, r]
    hidden = activation_fn(activation, torch.bmm(g.unsqueeze(1), pre).squeeze(1))  # act(P̄) [T, r]
    s = (g.unsqueeze(-1) * hidden.unsqueeze(1)).reshape(-1, n * r)  # block i: g_i·act(P̄)
    bias = g @ packed.b_up if residual is None else torch.addmm(residual, g, packed.b_up)
    return torch.addmm(bias, s, packed.w_up.T)


class _MergedRows(torch.autograd.Function):
    """Forward and backward of the module docstring's formulas (sources frozen)."""

    @staticmethod
    def forward(ctx, rows, g, w_down, b_down, w_up, b_up, residual, r, activation, recompute):
        t, n = g.shape
        pre = torch.addmm(b_down, rows, w_down.T)  # P [T, R]
        merged = torch.bmm(g.unsqueeze(1), pre.view(t, n, r)).squeeze(1)  # P̄ [T, r]
        s = g.unsqueeze(-1) * activation_fn(activation, merged).unsqueeze(1)  # [T, N, r]
        s = s.view(t, n * r)
        out = torch.mm(s, w_up.T) if residual is None else torch.addmm(residual, s, w_up.T)
        out.addmm_(g, b_up)
        ctx.save_for_backward(rows, g, w_down, b_down, w_up, b_up, None if recompute else pre, merged)
        ctx.activation, ctx.r = activation, r
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, g, w_down, b_down, w_up, b_up, pre, merged = ctx.saved_tensors
        need_rows, need_g = ctx.needs_input_grad[:2]
        need_res = ctx.needs_input_grad[6]
        t, n = g.shape
        if torch.is_grad_enabled():  # create_graph: P and P̄ again, as functions of z and g
            pre = torch.addmm(b_down, rows, w_down.T)
            merged = torch.bmm(g.unsqueeze(1), pre.view(t, n, ctx.r)).squeeze(1)
        d_rows = d_g = None
        if need_rows or need_g:
            d_s = (grad @ w_up).view(t, n, ctx.r)  # dS [T, N, r]
            d_hidden = torch.bmm(g.unsqueeze(1), d_s).squeeze(1)  # Σ_i g_i dS_i [T, r]
            if ctx.activation == "relu":
                d_merged = torch.ops.aten.threshold_backward(d_hidden, merged, 0)
            else:
                d_merged = d_hidden * activation_grad(ctx.activation, merged)
            if need_g:
                if pre is None:  # not kept (ops/saved_state.py): one GEMM brings it back
                    pre = torch.addmm(b_down, rows, w_down.T)
                hidden = activation_fn(ctx.activation, merged)
                d_g = torch.bmm(d_s, hidden.unsqueeze(-1))  # dS_i·act(P̄) [T, N, 1]
                d_g = torch.baddbmm(d_g, pre.view(t, n, ctx.r), d_merged.unsqueeze(-1))  # + P_i·dP̄
                d_g = torch.addmm(d_g.squeeze(-1), grad, b_up.T)  # + γ·B_i
            if need_rows:
                d_pre = (g.unsqueeze(-1) * d_merged.unsqueeze(1)).view(t, n * ctx.r)
                d_rows = d_pre @ w_down
        return d_rows, d_g, None, None, None, None, grad if need_res else None, None, None, None
