"""Backward kernels of ``scaled_adapter_sum`` (DESIGN.md §2), packed layout as in the forward.

With g = dL/dout [T, d], U = W ⊙ ω[s(·)]ᵀ [d, R], w = row_scale [T, N] (1 if absent):

    G   = g·U                                 [T, R]   (U folded on the fly from W and ω)
    dP  = G ⊙ w[:, s(·)] ⊙ act'(P)            [T, R]
    dz  = dP·D                                [T, d]   (``up_projection`` with W := Dᵀ, no fold)
    M   = Sᵀ·g,  S = act(P) ⊙ w[:, s(·)]      [R, d]   fp32, behind dω and dW_up
    dD  = dPᵀ·z                               [R, d]   fp32
    dw[t, i] = Σ_{c: s(c)=i} act(P)[t, c]·G[t, c] + (g·(ω⊙B)ᵀ)[t, i]
    Σ_t w[t, i]·g[t, :]                       [N, d]   behind dω's bias term and dB

The two [T, d]-sized products with an N-wide side (g·(ω⊙B)ᵀ and wᵀ·g) ride along as N
extra "bias units", one per source, so g is read once per kernel and never copied to
fp32 in torch: unit R + i has up column ω_i ⊙ B_i and hidden value w[:, i] (1 without
row_scale), i.e. S_ext = [S, w], U_ext = [U, (ω⊙B)ᵀ] and out = S_ext·U_extᵀ + residual.
``grad_pre(..., b_up=B)`` returns G's N extra columns, ``tn_gemm(..., num_sources=N)``
M's N extra rows.

Kernels:

* ``_grad_pre_kernel``: tiles [BLOCK_T, BLOCK_R] of G over a K-loop on d, then dP in the
  epilogue (P is re-read, S is never stored). When the row_scale gradient is wanted it
  also writes act(P) ⊙ G in fp32, plus the N bias-unit columns g·(ω⊙B)ᵀ; the per-source
  sum of its columns (O(T·(R + N))) is torch.
* ``_tn_gemm_kernel``: ``Aᵀ·B`` over the token axis for A [T, R], B [T, d] -> [R, d]
  fp32, with an optional prologue that turns A = P into S = act(P) ⊙ w[:, s(·)] while
  loading it, and the N bias-unit rows w[:, i] (``N_EXT``). The T axis is split
  deterministically: program (r, j, s) sums tokens [s·chunk, (s+1)·chunk) into its own
  fp32 partial [SPLIT, R, d], and torch sums the
  partials in a fixed order; no atomics, so the result is bit-reproducible. R and d
  are small (R·d of 384 x 4096 is ~24 tiles of 64 x 64), so without the split an H100
  (132 SMs) would sit mostly idle on M and dD.

The O(R·d) / O(N·d) remainder (dω's per-source reduction, dW_up, dB, db_D) is torch in
``scalearn_fast/ops/triton_backend.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .scaled_adapter_sum import (
    _act_id,
    _activation,
    _activation_grad,
    _configs,
    _mma,
    _omega_strides,
    _unit_stride,
)

_GRAD_PRE_CONFIGS = _configs(
    [
        ({"BLOCK_T": 128, "BLOCK_R": 64, "BLOCK_K": 64}, 4, 3),
        ({"BLOCK_T": 128, "BLOCK_R": 128, "BLOCK_K": 64}, 8, 3),
        ({"BLOCK_T": 64, "BLOCK_R": 64, "BLOCK_K": 64}, 4, 4),
        ({"BLOCK_T": 64, "BLOCK_R": 32, "BLOCK_K": 128}, 4, 3),
    ],
    {"BLOCK_T": 16, "BLOCK_R": 16, "BLOCK_K": 32},
)
# BLOCK_T must divide TOKEN_CHUNK so that each split is a whole number of T steps.
TOKEN_CHUNK = 128
_TN_CONFIGS = _configs(
    [
        ({"BLOCK_R": 64, "BLOCK_D": 64, "BLOCK_T": 64}, 4, 3),
        ({"BLOCK_R": 64, "BLOCK_D": 128, "BLOCK_T": 64}, 8, 3),
        ({"BLOCK_R": 128, "BLOCK_D": 64, "BLOCK_T": 64}, 8, 3),
        ({"BLOCK_R": 32, "BLOCK_D": 128, "BLOCK_T": 128}, 4, 3),
    ],
    {"BLOCK_R": 16, "BLOCK_D": 32, "BLOCK_T": 16},
)
TARGET_PROGRAMS = 264  # ~2 waves of an H100's 132 SMs: how far the T split tries to fill the device


@triton.autotune(configs=_GRAD_PRE_CONFIGS, key=["d", "R"])
@triton.jit
def _grad_pre_kernel(
    g_ptr, pre_ptr, w_ptr, omega_ptr, bu_ptr, src_ptr, rs_ptr, dpre_ptr, gs_ptr,
    T, d, R, N_EXT,
    stride_g_t, stride_g_d, stride_p_t, stride_p_r, stride_w_d, stride_w_r, stride_om_n, stride_om_d,
    stride_bu_n, stride_bu_d,
    stride_rs_t, stride_rs_n, stride_dp_t, stride_dp_r, stride_gs_t, stride_gs_r,
    ACT: tl.constexpr, HAS_RS: tl.constexpr, FOLD: tl.constexpr, STORE_GS: tl.constexpr,
    EXT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_t.to(tl.int64)
    cols = offs_c.to(tl.int64)
    is_unit = offs_c < R
    src = tl.load(src_ptr + offs_c, mask=is_unit, other=0)
    if EXT:  # columns R .. R + N_EXT - 1: the bias units, up column ω_i ⊙ B_i
        is_bias = (offs_c >= R) & (offs_c < R + N_EXT)
        src = tl.where(is_bias, (offs_c - R).to(src.dtype), src)
        in_ext = is_unit | is_bias
    else:
        in_ext = is_unit
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(
            g_ptr + rows[:, None] * stride_g_t + kk[None, :] * stride_g_d,
            mask=(offs_t[:, None] < T) & (kk[None, :] < d), other=0.0,
        )
        mask_u = (kk[:, None] < d) & is_unit[None, :]
        u = tl.load(w_ptr + kk[:, None] * stride_w_d + cols[None, :] * stride_w_r, mask=mask_u, other=0.0)
        if EXT:
            u = u.to(tl.float32) + tl.load(
                bu_ptr + src[None, :] * stride_bu_n + kk[:, None] * stride_bu_d,
                mask=(kk[:, None] < d) & is_bias[None, :], other=0.0,
            ).to(tl.float32)
        if FOLD:
            om = tl.load(
                omega_ptr + src[None, :] * stride_om_n + kk[:, None] * stride_om_d,
                mask=(kk[:, None] < d) & in_ext[None, :], other=0.0,
            )
            u = u.to(tl.float32) * om.to(tl.float32)
        acc = _mma(a, u.to(a.dtype), acc, IEEE)
    mask = (offs_t[:, None] < T) & (offs_c[None, :] < R)
    p = tl.load(pre_ptr + rows[:, None] * stride_p_t + offs_c[None, :] * stride_p_r, mask=mask, other=0.0)
    p = p.to(tl.float32)
    if STORE_GS:
        gs = _activation(p, ACT) * acc
        if EXT:
            gs = tl.where(is_unit[None, :], gs, acc)
        tl.store(
            gs_ptr + rows[:, None] * stride_gs_t + offs_c[None, :] * stride_gs_r,
            gs, mask=(offs_t[:, None] < T) & in_ext[None, :],
        )
    dp = acc * _activation_grad(p, ACT)
    if HAS_RS:
        rs_offs = rows[:, None] * stride_rs_t + src[None, :] * stride_rs_n
        dp = dp * tl.load(rs_ptr + rs_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        dpre_ptr + rows[:, None] * stride_dp_t + offs_c[None, :] * stride_dp_r,
        dp.to(dpre_ptr.dtype.element_ty), mask=mask,
    )


@triton.autotune(configs=_TN_CONFIGS, key=["d", "R"])
@triton.jit
def _tn_gemm_kernel(
    a_ptr, b_ptr, src_ptr, rs_ptr, part_ptr,
    T, d, R, N_EXT, chunk,
    stride_a_t, stride_a_r, stride_b_t, stride_b_d, stride_rs_t, stride_rs_n,
    stride_part_s, stride_part_r, stride_part_d,
    ACT: tl.constexpr, A_IS_PRE: tl.constexpr, HAS_RS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_c = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_j = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_tt = tl.arange(0, BLOCK_T)
    t_start = pid_s.to(tl.int64) * chunk
    t_end = tl.minimum(t_start + chunk, T)
    # rows R .. R + N_EXT - 1 (A_IS_PRE only): the bias units, A[t, R + i] = w[t, i] (1 without row_scale)
    is_bias = (offs_c >= R) & (offs_c < R + N_EXT)
    if HAS_RS:
        src = tl.load(src_ptr + offs_c, mask=offs_c < R, other=0)
        src = tl.where(is_bias, (offs_c - R).to(src.dtype), src)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        tt = t0 + offs_tt  # int64
        mask_a = (offs_c[:, None] < R) & (tt[None, :] < t_end)
        a = tl.load(a_ptr + tt[None, :] * stride_a_t + offs_c[:, None] * stride_a_r, mask=mask_a, other=0.0)
        b = tl.load(
            b_ptr + tt[:, None] * stride_b_t + offs_j[None, :] * stride_b_d,
            mask=(tt[:, None] < t_end) & (offs_j[None, :] < d), other=0.0,
        )
        if A_IS_PRE:  # S = act(P) ⊙ w[:, s(·)], rounded to the operand dtype like the forward's S
            h = _activation(a.to(tl.float32), ACT)
            mask_ext = is_bias[:, None] & (tt[None, :] < t_end)
            if HAS_RS:
                rs_offs = tt[None, :] * stride_rs_t + src[:, None] * stride_rs_n
                w = tl.load(rs_ptr + rs_offs, mask=mask_a | mask_ext, other=0.0).to(tl.float32)
                h = tl.where(mask_ext, w, h * w)
            else:
                h = tl.where(mask_ext, 1.0, h)
            a = tl.where(mask_a | mask_ext, h, 0.0).to(b.dtype)
        acc = _mma(a, b, acc, IEEE)
    tl.store(
        part_ptr + pid_s.to(tl.int64) * stride_part_s + offs_c[:, None] * stride_part_r
        + offs_j[None, :] * stride_part_d,
        acc, mask=(offs_c[:, None] < R + N_EXT) & (offs_j[None, :] < d),
    )


# --------------------------------------------------------------------------- launchers


def grad_pre(
    grad_out: torch.Tensor,
    pre: torch.Tensor,
    w_up: torch.Tensor,
    omega: torch.Tensor | None,
    source_index: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    activation: str = "relu",
    store_gs: bool = False,
    b_up: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dP [T, R] in g's dtype, act(P) ⊙ G [T, R] fp32 or empty)``, G = g·U.

    With ``b_up`` [N, d] (and ``omega``) the second output is ``[T, R + N]``: its last N
    columns are the bias units' g·(ω ⊙ B)ᵀ, so dw = its per-source column sum."""
    (source_index,) = _unit_stride(source_index)
    t, d = grad_out.shape
    r = pre.shape[1]
    ext = store_gs and b_up is not None
    if ext and omega is None:
        raise ValueError("grad_pre: the bias-unit columns (b_up) need omega")
    n_ext = b_up.shape[0] if ext else 0
    d_pre = grad_out.new_empty(t, r)
    gs = grad_out.new_empty(t, r + n_ext, dtype=torch.float32) if store_gs else grad_out.new_empty(0)
    if t == 0 or r + n_ext == 0:
        return d_pre, gs
    rs = row_scale if row_scale is not None else grad_out
    om = omega if omega is not None else grad_out
    bu = b_up if ext else grad_out
    gs_arg = gs if store_gs else d_pre
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(r + n_ext, meta["BLOCK_R"]))  # noqa: E731
    _grad_pre_kernel[grid](
        grad_out, pre, w_up, om, bu, source_index, rs, d_pre, gs_arg,
        t, d, r, n_ext,
        grad_out.stride(0), grad_out.stride(1), pre.stride(0), pre.stride(1), w_up.stride(0), w_up.stride(1),
        *_omega_strides(omega), bu.stride(0), bu.stride(1),
        rs.stride(0), rs.stride(1), d_pre.stride(0), d_pre.stride(1),
        gs_arg.stride(0), gs_arg.stride(1),
        ACT=_act_id(activation), HAS_RS=row_scale is not None, FOLD=omega is not None, STORE_GS=store_gs,
        EXT=ext, IEEE=grad_out.dtype == torch.float32,
    )
    return d_pre, gs


def grad_pre_ref(
    grad_out, pre, w_up, omega, source_index, row_scale=None, activation="relu", store_gs=False, b_up=None
):
    """Plain-PyTorch ``grad_pre`` (fp32 math)."""
    from scalearn_fast.ops.reference import activation_fn, activation_grad

    u = w_up.float()
    if omega is not None:
        u = u * omega.float().index_select(0, source_index).T
    g_u = grad_out.float() @ u
    p = pre.float()
    d_pre = g_u * activation_grad(activation, p)
    if row_scale is not None:
        d_pre = d_pre * row_scale.float().index_select(1, source_index)
    gs = activation_fn(activation, p) * g_u if store_gs else grad_out.new_empty(0)
    if store_gs and b_up is not None:
        gs = torch.cat([gs, grad_out.float() @ (omega.float() * b_up.float()).T], 1)
    return d_pre.to(grad_out.dtype), gs


def _num_splits(t: int, r: int, d: int) -> int:
    tiles = triton.cdiv(r, 64) * triton.cdiv(d, 64)
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), triton.cdiv(t, 2 * TOKEN_CHUNK)))


def tn_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    activation: str | None = None,
    source_index: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    num_sources: int = 0,
    splits: int | None = None,
) -> torch.Tensor:
    """``Aᵀ·B`` [R, d] fp32 for ``a [T, R]``, ``b [T, d]``; with ``activation`` A is P and the
    kernel uses S = act(P) ⊙ row_scale[:, s(·)] instead (M = Sᵀ·g). Deterministic split over T.

    With ``activation`` and ``num_sources = N`` the result is ``[R + N, d]``: row R + i is
    Σ_t w[t, i]·b[t, :] (w = row_scale, or 1), the bias units' share of dω and dB."""
    (source_index,) = _unit_stride(source_index)
    t, r = a.shape
    d = b.shape[1]
    n_ext = num_sources if activation is not None else 0
    rows = r + n_ext
    if t == 0 or rows == 0 or d == 0:
        return a.new_zeros(rows, d, dtype=torch.float32)
    if splits is None:
        splits = _num_splits(t, rows, d)
    chunk = triton.cdiv(triton.cdiv(t, max(1, splits)), TOKEN_CHUNK) * TOKEN_CHUNK
    splits = triton.cdiv(t, chunk)
    part = a.new_empty(splits, rows, d, dtype=torch.float32)
    rs = row_scale if row_scale is not None else a
    src = source_index if source_index is not None else a
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_D"]), splits)  # noqa: E731
    _tn_gemm_kernel[grid](
        a, b, src, rs, part,
        t, d, r, n_ext, chunk,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), rs.stride(0), rs.stride(1),
        part.stride(0), part.stride(1), part.stride(2),
        ACT=_act_id(activation or "identity"), A_IS_PRE=activation is not None, HAS_RS=row_scale is not None,
        IEEE=b.dtype == torch.float32,
    )
    return part[0].clone() if splits == 1 else part.sum(0)


def tn_gemm_ref(a, b, *, activation=None, source_index=None, row_scale=None, num_sources=0, splits=None):
    """Plain-PyTorch ``tn_gemm`` (fp32)."""
    from scalearn_fast.ops.reference import activation_fn

    a32 = a.float()
    if activation is not None:
        a32 = activation_fn(activation, a32)
        if row_scale is not None:
            a32 = a32 * row_scale.float().index_select(1, source_index)
        if num_sources:
            w = row_scale.float() if row_scale is not None else a32.new_ones(a.shape[0], num_sources)
            a32 = torch.cat([a32, w], 1)
        a32 = a32.to(b.dtype).float()
    return a32.T @ b.float()
