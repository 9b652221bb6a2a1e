"""The Triton backend (the CUDA default): ``forward``/``backward`` over a ``Composition``.

The math is ``torch_backend``'s. The T-sized GEMMs (forward and backward) run in the kernels of
``kernels/`` (``scalearn_fast.kernels``); the O(N·d) and O(R·d) pieces (the scaled bias, the
per-source ω reduction, dB, db_D, the per-source row_scale reduction) are ``algebra`` in torch.

Forward: the fused kernel (S kept on chip; only when next_pow2(R) <= ``kernels.FUSED_MAX_R``,
``FUSED_MAX_R_FP32`` for fp32 inputs) or ``down_projection`` then ``up_projection``; on CUDA the
faster of the two per shape class, measured once (``path_choice``). ``USE_FUSED`` forces a path:
True fused whenever it fits, False never (tests flip it to exercise both); None (default) chooses.

Operands the kernels cannot take run ``torch_backend`` (cuBLAS) instead: float64 (the kernels
accumulate in fp32 and do not compile for fp64), and, under ``TRITON_INTERPRET=1``, float64 and
bfloat16 (the interpreter's ``tl.dot`` is wrong for both); so do fp16 calls whose ω·W_up
leaves fp16's range (computed in fp32 there).

Task banks (``omega_bank``, ``task_index``; ``ops/bank.py``): a uniform bank [K, N, 1] runs on
these kernels as a per-row ``row_scale`` (Ω[k(t), :, 0]); a vector bank [K, N, d] runs
``ops/triton_bank.py`` (the kernels of kernels/task_bank.py, Ω applied per token in the up GEMM's
accumulator).
"""

from __future__ import annotations

import torch

from scalearn_fast._kernels import load_kernels

from . import algebra, bank, path_choice, torch_backend, triton_bank
from .backends import triton_interpreted
from .composition import Composition, Gradients

Tensor = torch.Tensor
USE_FUSED: bool | None = None


def runs_on_torch(dtype: torch.dtype) -> bool:
    """Whether calls in ``dtype`` go to the torch backend (see the module docstring)."""
    if dtype == torch.float64:
        return True
    return dtype == torch.bfloat16 and triton_interpreted()


def _fp16_overflow(call: Composition) -> bool:
    """fp16 operands whose ω-scaled up projection leaves fp16's range (the kernels apply ω to W in
    the operand dtype): the torch backend computes those calls (forward and backward) in fp32.
    A host sync, fp16 only."""
    return (
        call.z.dtype == torch.float16
        and call.omega is not None
        and algebra.fp16_fold_overflows(call.w_up, call.omega, call.source_index)
    )


def _bias(call: Composition) -> Tensor:
    """Σ_i ω_i ⊙ b_up_i [d] (fp32), w·(ω⊙B) [T, d] with row_scale, or the call's scaled_bias."""
    if call.omega is None:
        return call.scaled_bias.reshape(-1).contiguous()
    row_scale = None if call.row_scale is None else call.row_scale.float()
    return algebra.scaled_bias_rows(call.b_up.float(), call.omega.float(), row_scale).contiguous()


def forward(call: Composition) -> tuple[Tensor, Tensor]:
    """``(out [T, d], pre [T, R] or empty)``; see ``torch_backend.forward``."""
    z = call.z
    vector_bank = call.omega_bank is not None and not bank.is_uniform(call.omega_bank)
    if _fp16_overflow(call):  # checked once here: torch_backend.forward would check again
        return torch_backend.forward_in_fp32(call)
    if runs_on_torch(z.dtype):
        return torch_backend.forward(call)
    if vector_bank:
        return triton_bank.forward(call)
    if call.omega_bank is not None:
        return bank.forward(forward, call)
    k = load_kernels()
    w_down, w_up = call.w_down, call.w_up if call.omega is not None else call.scaled_up
    if w_down.dtype != z.dtype or w_up.dtype != z.dtype:
        w_down, w_up = w_down.to(z.dtype), w_up.to(z.dtype)
    bias = _bias(call)
    omega, row_scale, residual, save = call.omega, call.row_scale, call.residual, call.save_for_backward

    def fused() -> tuple[Tensor, Tensor]:
        return k.fused_forward(
            z, w_down, call.b_down, w_up, omega, call.source_index, bias, residual, row_scale,
            call.activation, save,
        )  # fmt: skip

    def two_kernel() -> tuple[Tensor, Tensor]:
        pre, hidden = k.down_projection(
            z, w_down, call.b_down, call.source_index, row_scale, call.activation, save
        )
        return k.up_projection(hidden, w_up, omega, call.source_index, bias, residual), pre

    r = w_down.shape[0]
    use = USE_FUSED is not False and k.fused_fits(r, z.dtype)
    if use and USE_FUSED is None:
        flags = (row_scale is not None, save, omega is None, residual is not None)
        key = path_choice.shape_class(z, r, *flags)
        use = path_choice.fused_is_faster(key, fused, two_kernel, measure=path_choice._can_measure(z))
    return fused() if use else two_kernel()


def backward(call: Composition, pre: Tensor, grad_out: Tensor, needs: Gradients) -> Gradients:
    """The gradients flagged in ``needs`` (see torch_backend).

    Kernels: dP (and act(P)⊙G for drow_scale) from ``grad_pre``; dz = dP·D from
    ``up_projection``; M = Sᵀ·g and dD = dPᵀ·z from ``tn_gemm`` (fp32, split over T).
    The N-wide token products g·(ω⊙B)ᵀ (drow_scale) and Σ_t w[t, i]·g[t, :] (dω, dB) ride
    along in those two kernels as N extra bias units (see kernels/scaled_adapter_sum_backward.py),
    so g is never copied to fp32 here. The rest is O(R·d + N·d + T·(R + N)) torch, reduced in
    fp32 and cast back.
    """
    z = call.z
    vector_bank = call.omega_bank is not None and not bank.is_uniform(call.omega_bank)
    if _fp16_overflow(call):
        return torch_backend.backward_in_fp32(call, pre, grad_out, needs)
    if runs_on_torch(z.dtype):
        return torch_backend.backward(call, pre, grad_out, needs)
    if vector_bank:
        return triton_bank.backward(call, pre, grad_out, needs)
    if call.omega_bank is not None:
        return bank.backward(backward, call, pre, grad_out, needs)
    k = load_kernels()
    g = grad_out
    dtype = z.dtype
    omega, row_scale, source_index, b_up = call.omega, call.row_scale, call.source_index, call.b_up
    n = call.num_sources
    w_down, w_up = call.w_down.to(dtype), call.w_up.to(dtype)
    r = pre.shape[1]
    d_z = d_wd = d_bd = d_wu = d_bu = d_omega = d_rs = None
    if needs.z or needs.w_down or needs.b_down or needs.row_scale:
        d_pre, gs = k.grad_pre(
            g, pre, w_up, omega, source_index, row_scale, call.activation, store_gs=needs.row_scale,
            b_up=b_up if needs.row_scale else None,
        )  # fmt: skip
        if needs.row_scale:  # gs [T, R + N]: the R units' act(P)⊙G, then each source's bias unit g·(ω_i⊙B_i)
            unit_source = torch.cat([source_index, torch.arange(n, device=source_index.device)])
            d_rs = algebra.segment_sum(gs, unit_source, n).to(row_scale.dtype)
        if needs.z:
            d_z = k.up_projection(d_pre, w_down.T, None, source_index, None)
        if needs.w_down:
            d_wd = k.tn_gemm(d_pre, z).to(dtype)
        if needs.b_down:
            d_bd = d_pre.float().sum(0).to(dtype)
    if needs.omega or needs.w_up or needs.b_up:
        # [S, w]ᵀ·g: rows :R are M = Sᵀ·g, rows R: are g_rows[i] = Σ_t w[t, i]·g[t, :]
        m_ext = k.tn_gemm(
            pre, g, activation=call.activation, source_index=source_index, row_scale=row_scale, num_sources=n
        )
        m, g_rows = m_ext[:r], m_ext[r:]
        if needs.omega:
            d_omega = algebra.omega_gradient(w_up.float(), m, b_up.float(), g_rows, source_index, omega)
        if needs.w_up:
            d_wu = (m * omega.float().index_select(0, source_index)).T.to(dtype)
        if needs.b_up:
            d_bu = (omega.float() * g_rows).to(b_up.dtype)
    return Gradients(d_z, d_wd, d_bd, d_wu, d_bu, d_omega, d_rs)
