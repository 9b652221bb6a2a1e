"""The Triton backend of ``scalearn_fast::scaled_adapter_sum`` (the CUDA default).

Same signatures and semantics as ``torch_backend`` (read its docstring for the math).
The T-sized GEMMs (forward and backward) run in the kernels of ``kernels/`` (``scalearn_fast.kernels``); the
O(N·d), O(R·d) and O(T·N) pieces (the folded bias, the per-source ω reduction, dB,
db_D, the per-source row_scale reduction) are plain torch here.

Forward: the fused kernel (S kept on chip; only when next_pow2(R) <= ``kernels.FUSED_MAX_R``,
``FUSED_MAX_R_FP32`` for fp32 inputs) or ``down_projection`` then ``up_projection``; on CUDA the
faster of the two per shape class, measured once (``path_choice``). ``USE_FUSED`` forces a path:
True fused whenever it fits, False never (tests flip it to exercise both); None (default) chooses.

float64 on a GPU runs ``torch_backend`` (cuBLAS): the kernels accumulate in fp32 and do not
compile for fp64 operands. (Under ``TRITON_INTERPRET=1`` on CPU they do run in fp64: the
interpreter is numpy.)
"""

from __future__ import annotations

import torch

from scalearn_fast._kernels import load_kernels

from . import path_choice, torch_backend

USE_FUSED: bool | None = None


def _bias(b_up, omega, row_scale):
    """Σ_i ω_i ⊙ b_up_i [d] (fp32), w·(ω⊙B) [T, d] with row_scale, or the folded b_up."""
    if omega is None:
        return b_up.reshape(-1).contiguous()
    scaled = omega.float() * b_up.float()  # [N, d]
    if row_scale is not None:
        return (row_scale.float() @ scaled).contiguous()
    return scaled.sum(0)


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
    """``z [T, d]`` -> ``(out [T, d], pre-activation [T, R] or empty)``; see ``torch_backend.forward``."""
    if z.dtype == torch.float64 and z.is_cuda:
        return torch_backend.forward(
            z, w_down, b_down, w_up, b_up, omega, source_index, residual, row_scale, activation, save_pre
        )
    k = load_kernels()
    dtype = z.dtype
    if w_down.dtype != dtype or w_up.dtype != dtype:
        w_down, w_up = w_down.to(dtype), w_up.to(dtype)
    bias = _bias(b_up, omega, row_scale)

    def fused() -> tuple[torch.Tensor, torch.Tensor]:
        return k.fused_forward(
            z, w_down, b_down, w_up, omega, source_index, bias, residual, row_scale, activation, save_pre
        )

    def two_kernel() -> tuple[torch.Tensor, torch.Tensor]:
        pre, hidden = k.down_projection(z, w_down, b_down, source_index, row_scale, activation, save_pre)
        return k.up_projection(hidden, w_up, omega, source_index, bias, residual), pre

    r = w_down.shape[0]
    use = USE_FUSED is not False and k.fused_fits(r, z.dtype)
    if use and USE_FUSED is None:
        flags = (row_scale is not None, save_pre, omega is None, residual is not None)
        key = path_choice.shape_class(z, r, *flags)
        use = path_choice.fused_is_faster(key, fused, two_kernel, measure=path_choice._can_measure(z))
    return fused() if use else two_kernel()


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
    """Gradients ``[dz, dw_down, db_down, dw_up, db_up, domega, drow_scale]`` (see torch_backend).

    Kernels: dP (and act(P)⊙G for drow_scale) from ``grad_pre``; dz = dP·D from
    ``up_projection``; M = Sᵀ·g and dD = dPᵀ·z from ``tn_gemm`` (fp32, split over T).
    The N-wide token products g·(ω⊙B)ᵀ (drow_scale) and Σ_t w[t, i]·g[t, :] (dω, dB) ride
    along in those two kernels as N extra bias units (see kernels/scaled_adapter_sum_backward.py),
    so g is never copied to fp32 here. The rest is O(R·d + N·d + T·(R + N)) torch, reduced in
    fp32 and cast back.
    """
    if z.dtype == torch.float64 and z.is_cuda:
        return torch_backend.backward(
            grad_out, z, pre, w_down, w_up, b_up, omega, source_index, row_scale, activation, needs
        )
    need_z, need_wd, need_bd, need_wu, need_bu, need_omega, need_rs = needs
    k = load_kernels()
    g = grad_out
    dtype = z.dtype
    n = omega.shape[0]
    w_down, w_up = w_down.to(dtype), w_up.to(dtype)
    r = pre.shape[1]
    d_z = d_wd = d_bd = d_wu = d_bu = d_omega = d_rs = None
    if need_z or need_wd or need_bd or need_rs:
        d_pre, gs = k.grad_pre(
            g, pre, w_up, omega, source_index, row_scale, activation, store_gs=need_rs,
            b_up=b_up if need_rs else None,
        )  # fmt: skip
        if need_rs:  # gs [T, R + N]: the R units' act(P)⊙G, then each source's bias unit g·(ω_i⊙B_i)
            unit_source = torch.cat([source_index, torch.arange(n, device=source_index.device)])
            d_rs = gs.new_zeros(gs.shape[0], n).index_add_(1, unit_source, gs).to(row_scale.dtype)
        if need_z:
            d_z = k.up_projection(d_pre, w_down.T, None, source_index, None)
        if need_wd:
            d_wd = k.tn_gemm(d_pre, z).to(dtype)
        if need_bd:
            d_bd = d_pre.float().sum(0).to(dtype)
    if need_omega or need_wu or need_bu:
        # [S, w]ᵀ·g: rows :R are M = Sᵀ·g, rows R: are g_rows[i] = Σ_t w[t, i]·g[t, :]
        m_ext = k.tn_gemm(
            pre, g, activation=activation, source_index=source_index, row_scale=row_scale, num_sources=n
        )
        m, g_rows = m_ext[:r], m_ext[r:]
        if need_omega:
            d_omega = torch.zeros(n, m.shape[1], dtype=torch.float32, device=g.device)
            d_omega.index_add_(0, source_index, w_up.float().T * m)
            d_omega += b_up.float() * g_rows
            if omega.shape[1] == 1:
                d_omega = d_omega.sum(1, keepdim=True)
            d_omega = d_omega.to(omega.dtype)
        if need_wu:
            d_wu = (m * omega.float().index_select(0, source_index)).T.to(dtype)
    if need_bu:
        d_bu = (omega.float() * g_rows).to(b_up.dtype)
    grads = [d_z, d_wd, d_bd, d_wu, d_bu, d_omega, d_rs]
    return [g.new_empty(0) if t is None else t for t in grads]  # one fresh empty each: no aliasing
