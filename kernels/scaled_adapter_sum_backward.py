"""Backward kernels of ``scaled_adapter_sum``, packed layout as in the forward.

With g = dL/dout [T, d], U = W ⊙ ω[s(·)]ᵀ [d, R], w = row_scale [T, N] (1 if absent):

    G   = g·U                                 [T, R]   (U folded on the fly from W and ω)
    dP  = G ⊙ w[:, s(·)] ⊙ act'(P)            [T, R]
    dz  = dP·D                                [T, d]   (``up_projection`` with W := Dᵀ and no ω)
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
  fp32 partial [SPLIT, R, d], and torch sums the partials in a fixed order; no atomics,
  so the result is bit-reproducible. R and d are small (R·d of 384 x 4096 is ~24 tiles
  of 64 x 64), so without the split an H100 (132 SMs) would sit mostly idle on M and dD.

The O(R·d) / O(N·d) remainder (dω's per-source reduction, dW_up, dB, db_D) is torch in
``scalearn_fast/ops/triton_backend.py``. Operand dtypes as in the forward
(``common.check_operands``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scalearn_fast.ops.activations import activation_id

from .common import (
    T_BY_R_TILES,
    KernelOperands,
    broadcast_omega,
    check_operands,
    check_same_dtype,
    configs,
)
from .tiles import activation, activation_grad, load_tile, mma, source_ids, store_tile, tile_mask

_GRAD_PRE_CONFIGS = configs(*T_BY_R_TILES)  # the down projection's: same [T, R] tiles, K-loop over d
# BLOCK_T must divide TOKEN_CHUNK so that each split is a whole number of T steps.
TOKEN_CHUNK = 128
# a row of a table: the named tile sizes, then num_warps and num_stages (common.configs)
_TN_CONFIGS = configs("BLOCK_R BLOCK_D BLOCK_T", small=(16, 32, 16), full=[
    (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (32, 128, 128, 4, 3),
])
TARGET_PROGRAMS = 264  # ~2 waves of an H100's 132 SMs: how far the T split tries to fill the device


# --------------------------------------------------------------------------- kernels


@triton.autotune(configs=_GRAD_PRE_CONFIGS, key=["d", "R"])
@triton.jit
def _grad_pre_kernel(
    # tensors: upstream gradient g, saved P, up projection, source ids, coefficients, B (bias units),
    # outputs dP and act(P) ⊙ G
    g_ptr, pre_ptr, w_ptr, src_ptr, omega_ptr, b_up_ptr, rs_ptr, dpre_ptr, gs_ptr,
    # sizes: tokens, hidden size, packed units, bias units (N with b_up, else 0)
    T, d, R, N_EXT,
    # strides (stride_<tensor>_<axis>)
    stride_g_t, stride_g_d, stride_pre_t, stride_pre_r, stride_w_d, stride_w_r,
    stride_omega_n, stride_omega_d, stride_b_up_n, stride_b_up_d, stride_rs_t, stride_rs_n,
    stride_dpre_t, stride_dpre_r, stride_gs_t, stride_gs_r,
    # absent inputs (common.KernelOperands): ω (W is already U), B, row_scale, act(P) ⊙ G (not wanted)
    HAS_OMEGA: tl.constexpr, HAS_B_UP: tl.constexpr, HAS_RS: tl.constexpr, HAS_GS: tl.constexpr,
    # the activation id
    ACT: tl.constexpr,
    # tiles (autotuned)
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tl.static_assert(HAS_OMEGA or not HAS_B_UP, "the bias units' up columns ω_i ⊙ B_i need ω")
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    is_unit = offs_c < R
    src = tl.load(src_ptr + offs_c, mask=is_unit, other=0)
    if HAS_B_UP:  # columns R .. R + N_EXT - 1: the bias units, up column ω_i ⊙ B_i
        is_bias = (offs_c >= R) & (offs_c < R + N_EXT)
        src = tl.where(is_bias, (offs_c - R).to(src.dtype), src)
        in_ext = is_unit | is_bias
    else:
        in_ext = is_unit
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + offs_k
        in_d = (kk < d)[:, None]
        a = load_tile(g_ptr, offs_t, kk, stride_g_t, stride_g_d, tile_mask(offs_t, kk, T, d))
        u = load_tile(w_ptr, kk, offs_c, stride_w_d, stride_w_r, in_d & is_unit[None, :])  # U[k, c] = W[k, c]
        if HAS_B_UP:
            bias_cols = load_tile(b_up_ptr, kk, src, stride_b_up_d, stride_b_up_n, in_d & is_bias[None, :])
            u = u.to(tl.float32) + bias_cols.to(tl.float32)
        if HAS_OMEGA:  # ⊙ ω[s(c), k]
            om = load_tile(omega_ptr, kk, src, stride_omega_d, stride_omega_n, in_d & in_ext[None, :])
            u = u.to(tl.float32) * om.to(tl.float32)
        acc = mma(a, u.to(a.dtype), acc)
    mask = tile_mask(offs_t, offs_c, T, R)
    p = load_tile(pre_ptr, offs_t, offs_c, stride_pre_t, stride_pre_r, mask).to(tl.float32)
    if HAS_GS:
        gs = activation(p, ACT) * acc
        if HAS_B_UP:
            gs = tl.where(is_unit[None, :], gs, acc)
        gs_mask = (offs_t[:, None] < T) & in_ext[None, :]
        store_tile(gs_ptr, gs, offs_t, offs_c, stride_gs_t, stride_gs_r, gs_mask)
    dp = acc * activation_grad(p, ACT)
    if HAS_RS:
        dp = dp * load_tile(rs_ptr, offs_t, src, stride_rs_t, stride_rs_n, mask).to(tl.float32)
    store_tile(dpre_ptr, dp, offs_t, offs_c, stride_dpre_t, stride_dpre_r, mask)


@triton.autotune(configs=_TN_CONFIGS, key=["d", "R"])
@triton.jit
def _tn_gemm_kernel(
    # tensors: A [T, R], B [T, d], source ids and row_scale (prologue), fp32 partials [SPLIT, R + N_EXT, d]
    a_ptr, b_ptr, src_ptr, rs_ptr, part_ptr,
    # sizes: tokens, columns of B, columns of A, bias units, tokens per split
    T, d, R, N_EXT, chunk,
    # strides (stride_<tensor>_<axis>)
    stride_a_t, stride_a_r, stride_b_t, stride_b_d, stride_rs_t, stride_rs_n,
    stride_part_s, stride_part_r, stride_part_d,
    # absent inputs (common.KernelOperands): source ids, row_scale
    HAS_SRC: tl.constexpr, HAS_RS: tl.constexpr,
    # A is P: the prologue makes it S = act(P) ⊙ w[:, s(·)] with the activation id ACT
    A_IS_PRE: tl.constexpr, ACT: tl.constexpr,
    # tiles (autotuned)
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    tl.static_assert(HAS_SRC or not HAS_RS, "row_scale is gathered by source id")
    pid_s = tl.program_id(2)
    offs_c = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_tt = tl.arange(0, BLOCK_T)
    t_start = pid_s.to(tl.int64) * chunk
    t_end = tl.minimum(t_start + chunk, T)
    # rows R .. R + N_EXT - 1 (A_IS_PRE only): the bias units, A[t, R + i] = w[t, i] (1 without row_scale)
    is_bias = (offs_c >= R) & (offs_c < R + N_EXT)
    if HAS_RS:
        src = source_ids(src_ptr, offs_c, R)
        src = tl.where(is_bias, (offs_c - R).to(src.dtype), src)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        tt = t0 + offs_tt  # int64
        mask_a = tile_mask(offs_c, tt, R, t_end)
        a = load_tile(a_ptr, offs_c, tt, stride_a_r, stride_a_t, mask_a)  # Aᵀ tile [BLOCK_R, BLOCK_T]
        b = load_tile(b_ptr, tt, offs_j, stride_b_t, stride_b_d, tile_mask(tt, offs_j, t_end, d))
        if A_IS_PRE:  # S = act(P) ⊙ w[:, s(·)], rounded to the operand dtype like the forward's S
            h = activation(a.to(tl.float32), ACT)
            mask_ext = is_bias[:, None] & (tt[None, :] < t_end)
            if HAS_RS:
                w = load_tile(rs_ptr, src, tt, stride_rs_n, stride_rs_t, mask_a | mask_ext).to(tl.float32)
                h = tl.where(mask_ext, w, h * w)
            else:
                h = tl.where(mask_ext, 1.0, h)
            a = tl.where(mask_a | mask_ext, h, 0.0).to(b.dtype)
        acc = mma(a, b, acc)
    part = part_ptr + pid_s.to(tl.int64) * stride_part_s
    mask = tile_mask(offs_c, offs_j, R + N_EXT, d)
    store_tile(part, acc, offs_c, offs_j, stride_part_r, stride_part_d, mask)


# the kernels' tensors: name:axes (a vector has none), then the optional ones (HAS_<NAME> flags)
_GRAD_PRE_OPERANDS = KernelOperands("g:td pre:tr w:dr src dpre:tr", optional="omega:nd b_up:nd rs:tn gs:tr")
_TN_OPERANDS = KernelOperands("a:tr b:td part:srd", optional="src rs:tn")


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
    check_operands("grad_pre", grad_out=grad_out, w_up=w_up)
    act = activation_id(activation)
    t, d = grad_out.shape
    r = pre.shape[1]
    b_up = b_up if store_gs else None  # the bias units only add columns to act(P) ⊙ G
    if b_up is not None and omega is None:
        raise ValueError("grad_pre: the bias-unit columns (b_up) need omega")
    n_ext = 0 if b_up is None else b_up.shape[0]
    d_pre = grad_out.new_empty(t, r)
    gs = grad_out.new_empty(t, r + n_ext, dtype=torch.float32) if store_gs else None
    if t == 0 or r + n_ext == 0:
        return d_pre, (grad_out.new_empty(0) if gs is None else gs)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(r + n_ext, meta["BLOCK_R"]))  # noqa: E731
    _grad_pre_kernel[grid](
        **_GRAD_PRE_OPERANDS(
            g=grad_out, pre=pre, w=w_up, src=source_index, dpre=d_pre,
            omega=broadcast_omega(omega, d), b_up=b_up, rs=row_scale, gs=gs,
        ),
        T=t, d=d, R=r, N_EXT=n_ext, ACT=act,
    )  # fmt: skip
    return d_pre, (grad_out.new_empty(0) if gs is None else gs)


def grad_pre_ref(
    grad_out, pre, w_up, omega, source_index, row_scale=None, activation="relu", store_gs=False, b_up=None
):
    """Plain-PyTorch ``grad_pre`` (fp32 math)."""
    from scalearn_fast.ops.activations import activation_fn, activation_grad

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


def token_splits(t: int, tiles: int, chunk: int) -> int:
    """How many deterministic splits over ``t`` tokens fill ~``TARGET_PROGRAMS`` programs when one
    split has ``tiles`` output tiles, each split covering at least two chunks of ``chunk`` tokens."""
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), triton.cdiv(t, 2 * chunk)))


def _num_splits(t: int, r: int, d: int) -> int:
    return token_splits(t, triton.cdiv(r, 64) * triton.cdiv(d, 64), TOKEN_CHUNK)


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
    check_operands("tn_gemm", a=a, b=b)
    if activation is None:
        check_same_dtype("tn_gemm", a=a, b=b)
    elif row_scale is not None and source_index is None:
        raise ValueError("tn_gemm: row_scale is gathered by source id; pass source_index with it")
    act = activation_id(activation or "identity")
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
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_D"]), splits)  # noqa: E731
    row_scale = row_scale if activation is not None else None  # only the prologue reads it
    _tn_gemm_kernel[grid](
        **_TN_OPERANDS(a=a, b=b, part=part, src=source_index, rs=row_scale),
        T=t, d=d, R=r, N_EXT=n_ext, chunk=chunk, A_IS_PRE=activation is not None, ACT=act,
    )  # fmt: skip
    return part[0].clone() if splits == 1 else part.sum(0)


def tn_gemm_ref(a, b, *, activation=None, source_index=None, row_scale=None, num_sources=0, splits=None):
    """Plain-PyTorch ``tn_gemm`` (fp32)."""
    from scalearn_fast.ops.activations import activation_fn

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
