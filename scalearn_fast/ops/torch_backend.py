"""The collapsed two-GEMM form in plain PyTorch (any device; the CPU default).

Forward, with the packed layout of ``packing.py`` and per-column source ids s(c):

    P   = z·Dᵀ + b_D                    [T, R]   pre-activation (saved for backward)
    S   = act(P) ⊙ w[:, s(·)]           [T, R]   w = per-token row_scale, 1 if absent
    U   = W ⊙ ω[s(·)]ᵀ                  [d, R]   ω-scaled up projections
    out = S·Uᵀ + w·(ω ⊙ B) + residual   [T, d]   (w·(ω⊙B) is Σ_i ω_i ⊙ b_up_i without w)

Backward, g = dL/dout (DESIGN.md §2):

    G   = g·U                           [T, R]
    dP  = G ⊙ w[:, s(·)] ⊙ act'(P)      → dz = dP·D
    M   = Sᵀ·g                          [R, d]   the one GEMM behind dω and dW
    dω[i, j] = Σ_{c: s(c)=i} W[j, c]·M[c, j] + B[i, j]·Σ_t w[t, i]·g[t, j]
    dW  = (M ⊙ ω[s(·)])ᵀ,  dB = ω ⊙ (wᵀ·g),  dD = dPᵀ·z,  db_D = Σ_t dP
    dw[t, i] = Σ_{c: s(c)=i} act(P)[t, c]·G[t, c] + Σ_j g[t, j]·ω_i[j]·B[i, j]

Only P (T x R) is kept for backward: O(T·N·r) memory, never N [T, d] outputs.
"""

from __future__ import annotations

import torch

from .reference import activation_fn, activation_grad


def fold_omega(w_up: torch.Tensor, b_up: torch.Tensor, omega: torch.Tensor, source_index: torch.Tensor):
    """U = W ⊙ ω[s(·)]ᵀ  [d, R] and the folded bias Σ_i ω_i ⊙ b_up_i  [d]."""
    omega_cols = omega.index_select(0, source_index)  # [R, d] or [R, 1]
    return w_up * omega_cols.T, (omega * b_up).sum(0)


def _segment_sum(values: torch.Tensor, source_index: torch.Tensor, num_sources: int) -> torch.Tensor:
    """Sum columns of ``values [T, R]`` that belong to the same source -> [T, N]."""
    out = values.new_zeros(values.shape[0], num_sources)
    return out.index_add_(1, source_index, values)


def forward(
    z: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    omega: torch.Tensor | None,
    source_index: torch.Tensor,
    residual: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    activation: str,
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``z [T, d]`` -> ``(out [T, d], pre-activation [T, R] or empty)``.

    ``omega=None`` is the inference fast path: ``w_up`` is then the folded U and
    ``b_up`` the folded bias ``[1, d]`` (see ``fold_omega``); no row_scale.
    """
    pre = torch.addmm(b_down, z, w_down.T)
    # Inference never needs P again, so the activation (and row scaling) may overwrite it.
    hidden = activation_fn(activation, pre, inplace=not save_pre)
    if omega is None:
        u, bias = w_up, b_up.reshape(-1)
    else:
        u, bias = fold_omega(w_up, b_up, omega, source_index)
    if row_scale is not None:
        scale_cols = row_scale.index_select(1, source_index)
        keeps_pre = save_pre and hidden is pre  # identity activation: P itself must survive
        hidden = hidden * scale_cols if keeps_pre else hidden.mul_(scale_cols)
        bias = row_scale @ (omega * b_up)  # [T, d]: Σ_i w[t, i]·ω_i ⊙ b_up_i
    out = torch.addmm(bias, hidden, u.T)
    if residual is not None:
        out.add_(residual)
    return out, (pre if save_pre else pre.new_empty(0))


def backward(
    grad_out: torch.Tensor,
    z: torch.Tensor,
    pre: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    omega: torch.Tensor,
    source_index: torch.Tensor,
    row_scale: torch.Tensor | None,
    activation: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Gradients ``[dz, dw_down, db_down, dw_up, db_up, domega, drow_scale]``.

    ``needs`` has one flag per entry; an entry not needed comes back empty.
    """
    need_z, need_wd, need_bd, need_wu, need_bu, need_omega, need_rs = needs
    g = grad_out
    n = omega.shape[0]
    act = activation_fn(activation, pre)
    scale_cols = None if row_scale is None else row_scale.index_select(1, source_index)
    if need_omega or need_bu:  # sum over tokens of g, weighted per source by row_scale: [N, d]
        g_rows = g.sum(0, keepdim=True).expand(n, -1) if row_scale is None else row_scale.T @ g

    d_z = d_wd = d_bd = d_wu = d_bu = d_omega = d_rs = None
    if need_z or need_wd or need_bd or need_rs:
        g_u = g @ (w_up * omega.index_select(0, source_index).T)  # g·U  [T, R]
        if need_rs:
            d_rs = _segment_sum(act * g_u, source_index, n) + g @ (omega * b_up).T
        if activation == "relu":  # one pass, same NaN rule as activation_grad (NaN > 0 is False)
            d_pre = torch.where(pre > 0, g_u, 0.0)
        else:
            d_pre = g_u * activation_grad(activation, pre)
        if scale_cols is not None:
            d_pre = d_pre * scale_cols
        if need_z:
            d_z = d_pre @ w_down
        if need_wd:
            d_wd = d_pre.T @ z
        if need_bd:
            d_bd = d_pre.sum(0)
    if need_omega or need_wu:
        hidden = act if scale_cols is None else act * scale_cols
        m = hidden.T @ g  # [R, d]: the one GEMM
        if need_omega:
            acc = torch.promote_types(m.dtype, torch.float32)  # reduce in >= fp32
            per_col = (w_up.T * m).to(acc)  # [R, d]
            d_omega = torch.zeros(n, m.shape[1], dtype=acc, device=g.device)
            d_omega.index_add_(0, source_index, per_col)
            d_omega = d_omega + (b_up * g_rows).to(acc)
            if omega.shape[1] == 1:
                d_omega = d_omega.sum(1, keepdim=True)
            d_omega = d_omega.to(omega.dtype)
        if need_wu:
            d_wu = (m * omega.index_select(0, source_index)).T
    if need_bu:
        d_bu = omega * g_rows
    grads = [d_z, d_wd, d_bd, d_wu, d_bu, d_omega, d_rs]
    return [g.new_empty(0) if t is None else t for t in grads]  # one fresh empty each: no aliasing
