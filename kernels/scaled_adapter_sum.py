"""Forward kernels of ``scaled_adapter_sum`` in the packed layout of
``scalearn_fast/ops/packing.py``: D [R, d], b_D [R], W [d, R], ω [N, d] or [N, 1],
source ids s(c) [R], optional per-token row_scale w [T, N].

    P   = z·Dᵀ + b_D                         [T, R]   (kept for backward when training)
    S   = act(P) ⊙ w[:, s(·)]                 [T, R]
    U   = W ⊙ ω[s(·)]ᵀ                        [d, R]   with ω given: built on the fly, never stored
    out = S·Uᵀ + bias + residual              [T, d]

``bias`` is Σ_i ω_i ⊙ b_up_i  [d], or with row_scale the [T, d] tensor w·(ω ⊙ B); both are
O(N·d) / O(T·N·d) and computed in torch by the caller. When ω is already folded into W (the
inference path), the caller passes ``omega=None`` and W *is* U.

Kernels:

* ``_down_projection_kernel``: tiles [BLOCK_T, BLOCK_R] of P over a K-loop on d; writes P
  (training) and S in the input dtype.
* ``_up_projection_kernel``: tiles [BLOCK_T, BLOCK_D] of out over a K-loop on R; reads S and
  builds the matching tile of Uᵀ from W and ω[s(·)] in registers. Without ω and bias it is a
  plain ``A·Bᵀ`` GEMM, which the backward reuses for dz = dP·D.
* ``_fused_kernel``: one program per BLOCK_T rows; S[BLOCK_T, R_PAD] stays in registers
  (R_PAD = next_pow2(R)), then the program sweeps the d output tiles. This saves writing
  and re-reading S (2·T·R elements) and one launch, and the z tile of the first GEMM and
  the out tile of the second never overlap in time, so register pressure is one S block
  plus one operand tile. It is used when R_PAD <= ``FUSED_MAX_R`` (512): past that the
  [BLOCK_T, R_PAD] fp32 accumulator no longer fits in registers at a useful BLOCK_T, and
  the second GEMM's parallelism over d tiles (which the fused kernel gives up: its grid
  is over T only) matters more than the saved S traffic. Adapter bottlenecks are small
  (N·r of 8 x 48 = 384 is typical), so the fused kernel is the common case.
  fp32 operands are capped lower, at ``FUSED_MAX_R_FP32`` (64): compiled offline for sm_90a
  (triton 3.9 + ptxas), the fp32 fused kernel needs 416-448 KB of shared memory at R_PAD = 512
  and up to 450 KB at 256 for the configs that survive pruning (an H100 block gets 227 KB,
  so every config would fail with OutOfResources), while at R_PAD <= 64 all configs fit in
  <= 112 KB. fp32 ``ieee`` dots run on FMA units, not tensor cores, so the fused kernel
  saves little there anyway.

Padding: tiles load 0 outside the tensors, and no padded entry is ever stored. The fused kernel
also sets S to exactly 0 in its padded columns c >= R before the second GEMM: a z row of ±inf
meets D's zero padding there as inf·0 = NaN, which would otherwise reach the row's output.

All accumulation is fp32 (``input_precision="ieee"`` for fp32 operands so fp32 stays
accurate, the default tensor-core path otherwise; see ``tiles.mma``). Operands are float32,
float16 or bfloat16 (float32 or float16 under ``TRITON_INTERPRET=1``: ``common.check_operands``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scalearn_fast.ops.activations import activation_id

from .common import (
    T_BY_R_TILES,
    KernelOperands,
    autotune_enabled,  # noqa: F401  (also read as scaled_adapter_sum.autotune_enabled)
    bias_rows,
    broadcast_omega,
    check_bias,
    check_operands,
    check_same_dtype,
    configs,
)
from .tiles import activation, load_tile, mma, source_ids, store_tile, tile_mask

FUSED_MAX_R = 512  # largest next_pow2(R) the fused kernel keeps on chip (module-level: tests patch it)
FUSED_MAX_R_FP32 = 64  # the same for 4-byte operands (shared memory; see the module docstring)

# Hopper-sensible tiles: 64/128-row tiles, K steps of 32/64, 4-8 warps, 3-4 stages. A row of a
# table: the named tile sizes, then num_warps and num_stages (common.configs).
_DOWN_CONFIGS = configs(*T_BY_R_TILES)
_UP_CONFIGS = configs("BLOCK_T BLOCK_D BLOCK_K", small=(16, 32, 16), full=[
    (128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 4), (64, 64, 32, 4, 4),
])
_FUSED_CONFIGS = configs("BLOCK_T BLOCK_D BLOCK_K", small=(16, 32, 32), full=[
    (64, 64, 64, 4, 3), (64, 64, 64, 8, 2), (64, 32, 32, 8, 2), (64, 128, 32, 8, 3), (128, 64, 32, 8, 2),
    (32, 128, 64, 4, 3), (32, 64, 64, 8, 2), (16, 64, 64, 8, 2),
])


def _prune_fused(configs, named_args, **kwargs):
    """Keep configs whose fp32 S block [BLOCK_T, R_PAD] is <= 128 registers a thread; for
    R_PAD = 512 that leaves BLOCK_T <= 64 at 8 warps. BLOCK_T = 64 is the smallest row tile of
    a Hopper wgmma; compiled for sm_90a at R_PAD = 512 (bf16, 8 warps, 2 stages) it takes 210
    registers, 200 KB of shared memory and no spills (scripts/sm90_resource_report.py), while
    the 4-warp version spills. Never prunes to nothing."""
    r_pad = {**named_args, **kwargs}["R_PAD"]
    fits = [c for c in configs if c.kwargs["BLOCK_T"] * r_pad <= 128 * 32 * c.num_warps]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_T"])]


# --------------------------------------------------------------------------- tile helpers


@triton.jit
def _down_tile(
    # tensors: input, down projection, its bias, source ids, row_scale, P (written when HAS_PRE)
    z_ptr, wd_ptr, bd_ptr, src_ptr, rs_ptr, pre_ptr,
    # sizes, and the tile's token rows and packed columns
    T, d, R, offs_t, offs_c,
    # strides
    stride_z_t, stride_z_d, stride_wd_r, stride_wd_d, stride_rs_t, stride_rs_n, stride_pre_t, stride_pre_r,
    # absent inputs, the activation id, the K step
    HAS_RS: tl.constexpr, HAS_PRE: tl.constexpr, ACT: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """S = act(z·Dᵀ + b_D) ⊙ w[:, s(·)] as an fp32 [len(offs_t), len(offs_c)] tile (K-loop over d);
    stores P = z·Dᵀ + b_D first when ``HAS_PRE``. Outside [0, T) x [0, R) the tile holds
    anything (NaN where a z row of ±inf met D's zero padding): callers mask it."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((offs_t.shape[0], offs_c.shape[0]), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + offs_k
        a = load_tile(z_ptr, offs_t, kk, stride_z_t, stride_z_d, tile_mask(offs_t, kk, T, d))
        b = load_tile(wd_ptr, kk, offs_c, stride_wd_d, stride_wd_r, tile_mask(kk, offs_c, d, R))
        acc = mma(a, b, acc)
    acc += tl.load(bd_ptr + offs_c, mask=offs_c < R, other=0.0).to(tl.float32)[None, :]
    mask = tile_mask(offs_t, offs_c, T, R)
    if HAS_PRE:
        store_tile(pre_ptr, acc, offs_t, offs_c, stride_pre_t, stride_pre_r, mask)
    h = activation(acc, ACT)
    if HAS_RS:  # w[t, s(c)]
        w = load_tile(rs_ptr, offs_t, source_ids(src_ptr, offs_c, R), stride_rs_t, stride_rs_n, mask)
        h = h * w.to(tl.float32)
    return h


@triton.jit
def _ut_tile(
    # tensors: up projection, source ids, ω (folded in when HAS_OMEGA)
    w_ptr, src_ptr, omega_ptr,
    # the tile's packed units and output columns, and their bounds
    offs_c, offs_j, R, d,
    # strides
    stride_w_d, stride_w_r, stride_omega_n, stride_omega_d,
    HAS_OMEGA: tl.constexpr,
):  # fmt: skip
    """Uᵀ[c, j] = W[j, c]·ω[s(c), j] as an fp32 [len(offs_c), len(offs_j)] tile (0 outside)."""
    mask = tile_mask(offs_c, offs_j, R, d)
    ut = load_tile(w_ptr, offs_c, offs_j, stride_w_r, stride_w_d, mask).to(tl.float32)
    if HAS_OMEGA:  # ω[s(c), j]
        src = source_ids(src_ptr, offs_c, R)
        om = load_tile(omega_ptr, src, offs_j, stride_omega_n, stride_omega_d, mask)
        ut = ut * om.to(tl.float32)
    return ut


@triton.jit
def _epilogue(
    acc, offs_t, offs_j, T, d,
    # tensors: bias ([1, d] broadcast or [T, d]), residual, out
    bias_ptr, res_ptr, out_ptr,
    # strides
    stride_bias_t, stride_bias_d, stride_res_t, stride_res_d, stride_out_t, stride_out_d,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BIAS_ROWS: tl.constexpr,
):  # fmt: skip
    """out = acc + bias + residual, stored in out's dtype."""
    mask = tile_mask(offs_t, offs_j, T, d)
    if HAS_BIAS:
        if BIAS_ROWS:
            acc += load_tile(bias_ptr, offs_t, offs_j, stride_bias_t, stride_bias_d, mask).to(tl.float32)
        else:
            bias = tl.load(bias_ptr + offs_j * stride_bias_d, mask=offs_j < d, other=0.0)
            acc += bias.to(tl.float32)[None, :]
    if HAS_RES:
        acc += load_tile(res_ptr, offs_t, offs_j, stride_res_t, stride_res_d, mask).to(tl.float32)
    store_tile(out_ptr, acc, offs_t, offs_j, stride_out_t, stride_out_d, mask)


# --------------------------------------------------------------------------- kernels


@triton.autotune(configs=_DOWN_CONFIGS, key=["d", "R"])
@triton.jit
def _down_projection_kernel(
    # inputs: z, down projection D and its bias b_D, source ids, row_scale w
    z_ptr, wd_ptr, bd_ptr, src_ptr, rs_ptr,
    # outputs: P, S
    pre_ptr, s_ptr,
    # sizes: tokens, hidden size, packed units
    T, d, R,
    # strides (stride_<tensor>_<axis>)
    stride_z_t, stride_z_d, stride_wd_r, stride_wd_d, stride_rs_t, stride_rs_n,
    stride_pre_t, stride_pre_r, stride_s_t, stride_s_r,
    # absent inputs (common.KernelOperands): row_scale, P (not saved)
    HAS_RS: tl.constexpr, HAS_PRE: tl.constexpr,
    # the activation id
    ACT: tl.constexpr,
    # tiles (autotuned)
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = _down_tile(
        z_ptr, wd_ptr, bd_ptr, src_ptr, rs_ptr, pre_ptr, T, d, R, offs_t, offs_c,
        stride_z_t, stride_z_d, stride_wd_r, stride_wd_d, stride_rs_t, stride_rs_n,
        stride_pre_t, stride_pre_r, HAS_RS, HAS_PRE, ACT, BLOCK_K,
    )  # fmt: skip
    store_tile(s_ptr, h, offs_t, offs_c, stride_s_t, stride_s_r, tile_mask(offs_t, offs_c, T, R))


@triton.autotune(configs=_UP_CONFIGS, key=["d", "R"])
@triton.jit
def _up_projection_kernel(
    # inputs: S, up projection W, source ids, ω, bias, residual
    s_ptr, w_ptr, src_ptr, omega_ptr, bias_ptr, res_ptr,
    # output
    out_ptr,
    # sizes: tokens, hidden size, packed units
    T, d, R,
    # strides (stride_<tensor>_<axis>)
    stride_s_t, stride_s_r, stride_w_d, stride_w_r, stride_omega_n, stride_omega_d,
    stride_bias_t, stride_bias_d, stride_res_t, stride_res_d, stride_out_t, stride_out_d,
    # absent inputs (common.KernelOperands): ω (W is already U), bias, residual
    HAS_OMEGA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    # whether the bias has one row per token
    BIAS_ROWS: tl.constexpr,
    # tiles (autotuned)
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        kk = k0 + offs_k
        a = load_tile(s_ptr, offs_t, kk, stride_s_t, stride_s_r, tile_mask(offs_t, kk, T, R))
        ut = _ut_tile(
            w_ptr, src_ptr, omega_ptr, kk, offs_j, R, d,
            stride_w_d, stride_w_r, stride_omega_n, stride_omega_d, HAS_OMEGA,
        )  # fmt: skip
        acc = mma(a, ut.to(a.dtype), acc)
    _epilogue(
        acc, offs_t, offs_j, T, d, bias_ptr, res_ptr, out_ptr,
        stride_bias_t, stride_bias_d, stride_res_t, stride_res_d, stride_out_t, stride_out_d,
        HAS_BIAS, HAS_RES, BIAS_ROWS,
    )  # fmt: skip


@triton.autotune(
    configs=_FUSED_CONFIGS, key=["d", "R"], prune_configs_by={"early_config_prune": _prune_fused}
)
@triton.jit
def _fused_kernel(
    # inputs: z, adapter weights D, b_D and W, source ids, coefficients ω and w, bias, residual
    z_ptr, wd_ptr, bd_ptr, w_ptr, src_ptr, omega_ptr, rs_ptr, bias_ptr, res_ptr,
    # outputs: P, out
    pre_ptr, out_ptr,
    # sizes: tokens, hidden size, packed units
    T, d, R,
    # strides (stride_<tensor>_<axis>)
    stride_z_t, stride_z_d, stride_wd_r, stride_wd_d, stride_w_d, stride_w_r, stride_omega_n, stride_omega_d,
    stride_rs_t, stride_rs_n, stride_bias_t, stride_bias_d, stride_res_t, stride_res_d,
    stride_pre_t, stride_pre_r, stride_out_t, stride_out_d,
    # absent inputs (common.KernelOperands): ω (W is already U), row_scale, bias, residual, P
    HAS_OMEGA: tl.constexpr, HAS_RS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_PRE: tl.constexpr,
    # the activation id, whether the bias has one row per token, next_pow2(R) (>= 16)
    ACT: tl.constexpr, BIAS_ROWS: tl.constexpr, R_PAD: tl.constexpr,
    # tiles (autotuned)
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, R_PAD)
    # first GEMM: S[BLOCK_T, R_PAD] = act(z·Dᵀ + b_D) ⊙ w[:, s(·)], K-loop over d
    h = _down_tile(
        z_ptr, wd_ptr, bd_ptr, src_ptr, rs_ptr, pre_ptr, T, d, R, offs_t, offs_c,
        stride_z_t, stride_z_d, stride_wd_r, stride_wd_d, stride_rs_t, stride_rs_n,
        stride_pre_t, stride_pre_r, HAS_RS, HAS_PRE, ACT, BLOCK_K,
    )  # fmt: skip
    # padded columns c >= R contribute exactly 0 to the second GEMM, never NaN·0 (a z row of ±inf
    # meets D's zero padding as inf·0 = NaN); padded rows t >= T are never stored
    s = h.to(z_ptr.dtype.element_ty)
    s = tl.where(offs_c[None, :] < R, s, 0.0).to(s.dtype)
    # second GEMM: sweep the output d tiles with S on chip
    for j0 in range(0, d, BLOCK_D):
        offs_j = j0 + tl.arange(0, BLOCK_D)
        ut = _ut_tile(
            w_ptr, src_ptr, omega_ptr, offs_c, offs_j, R, d,
            stride_w_d, stride_w_r, stride_omega_n, stride_omega_d, HAS_OMEGA,
        )  # fmt: skip
        out = mma(s, ut.to(s.dtype), tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32))
        _epilogue(
            out, offs_t, offs_j, T, d, bias_ptr, res_ptr, out_ptr,
            stride_bias_t, stride_bias_d, stride_res_t, stride_res_d, stride_out_t, stride_out_d,
            HAS_BIAS, HAS_RES, BIAS_ROWS,
        )  # fmt: skip


# the kernels' tensors: name:axes (a vector has none), then the optional ones (HAS_<NAME> flags)
_DOWN_OPERANDS = KernelOperands("z:td wd:rd bd src s:tr", optional="rs:tn pre:tr")
_UP_OPERANDS = KernelOperands("s:tr w:dr src out:td", optional="omega:nd bias:td res:td")
_FUSED_OPERANDS = KernelOperands(
    "z:td wd:rd bd w:dr src out:td", optional="omega:nd rs:tn bias:td res:td pre:tr"
)


# --------------------------------------------------------------------------- launchers


def _fused_limit(dtype: torch.dtype | None) -> int:
    return FUSED_MAX_R_FP32 if dtype is not None and dtype.itemsize >= 4 else FUSED_MAX_R


def fused_fits(num_units: int, dtype: torch.dtype | None = None) -> bool:
    """Whether next_pow2(R) fits the fused kernel's on-chip S block for operands of ``dtype``
    (None: 2-byte operands)."""
    return max(16, triton.next_power_of_2(max(num_units, 1))) <= _fused_limit(dtype)


def down_projection(
    z: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    source_index: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    activation: str = "relu",
    save_pre: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P or empty, S)`` for ``z [T, d]``: P = z·Dᵀ + b_D, S = act(P) ⊙ row_scale[:, s(·)]."""
    check_operands("down_projection", z=z, w_down=w_down)
    check_same_dtype("down_projection", z=z, w_down=w_down)
    act = activation_id(activation)
    t, d = z.shape
    r = w_down.shape[0]
    hidden = z.new_empty(t, r)
    pre = z.new_empty(t, r) if save_pre else None
    if t == 0 or r == 0:
        return (z.new_empty(0) if pre is None else pre), hidden.zero_()
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(r, meta["BLOCK_R"]))  # noqa: E731
    _down_projection_kernel[grid](
        **_DOWN_OPERANDS(z=z, wd=w_down, bd=b_down, src=source_index, s=hidden, rs=row_scale, pre=pre),
        T=t, d=d, R=r, ACT=act,
    )  # fmt: skip
    return (z.new_empty(0) if pre is None else pre), hidden


def down_projection_ref(z, w_down, b_down, source_index, row_scale=None, activation="relu", save_pre=False):
    """Plain-PyTorch ``down_projection`` (fp32 math, outputs in z's dtype)."""
    from scalearn_fast.ops.activations import activation_fn

    pre = z.float() @ w_down.float().T + b_down.float()
    hidden = activation_fn(activation, pre)
    if row_scale is not None:
        hidden = hidden * row_scale.float().index_select(1, source_index)
    return (pre.to(z.dtype) if save_pre else z.new_empty(0)), hidden.to(z.dtype)


def up_projection(
    hidden: torch.Tensor,
    w_up: torch.Tensor,
    omega: torch.Tensor | None,
    source_index: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``out [T, d] = S·Uᵀ + bias + residual``, U = W ⊙ ω[s(·)]ᵀ (``omega=None``: W is U).

    ``bias`` is ``[d]``, ``[T, d]`` (per-row), or None. Any ``w_up`` strides work: the
    backward passes D viewed as ``[d, R]`` to get dz = dP·D from the same kernel.
    """
    check_operands("up_projection", hidden=hidden, w_up=w_up)
    t, r = hidden.shape
    d = w_up.shape[0]
    check_bias(bias, t, d)
    out = hidden.new_empty(t, d, dtype=out_dtype or hidden.dtype)
    if t == 0:
        return out
    bias = bias_rows(bias, d)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    _up_projection_kernel[grid](
        **_UP_OPERANDS(
            s=hidden, w=w_up, src=source_index, out=out,
            omega=broadcast_omega(omega, d), bias=bias, res=residual,
        ),
        T=t, d=d, R=r, BIAS_ROWS=bias is not None and bias.shape[0] > 1,
    )  # fmt: skip
    return out


def up_projection_ref(hidden, w_up, omega, source_index, bias, residual=None, out_dtype=None):
    """Plain-PyTorch ``up_projection`` (fp32 math)."""
    u = w_up.float()
    if omega is not None:
        u = u * omega.float().index_select(0, source_index).T
    out = hidden.float() @ u.T
    if bias is not None:
        out = out + bias.float()
    if residual is not None:
        out = out + residual.float()
    return out.to(out_dtype or hidden.dtype)


def fused_forward(
    z: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    omega: torch.Tensor | None,
    source_index: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    activation: str = "relu",
    save_pre: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, d], P or empty)`` in one kernel, S kept on chip (needs ``fused_fits(R)``)."""
    check_operands("fused_forward", z=z, w_down=w_down, w_up=w_up)
    check_same_dtype("fused_forward", z=z, w_down=w_down)
    act = activation_id(activation)
    t, d = z.shape
    r = w_down.shape[0]
    check_bias(bias, t, d)
    r_pad = max(16, triton.next_power_of_2(max(r, 1)))
    if r_pad > _fused_limit(z.dtype):
        raise ValueError(
            f"fused_forward keeps S on chip for next_pow2(R) <= {_fused_limit(z.dtype)} "
            f"with {z.dtype} operands; got R={r}"
        )
    out = z.new_empty(t, d)
    pre = z.new_empty(t, r) if save_pre else None
    if t == 0:
        return out, (z.new_empty(0) if pre is None else pre)
    bias = bias_rows(bias, d)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]),)  # noqa: E731
    _fused_kernel[grid](
        **_FUSED_OPERANDS(
            z=z, wd=w_down, bd=b_down, w=w_up, src=source_index, out=out,
            omega=broadcast_omega(omega, d), rs=row_scale, bias=bias, res=residual, pre=pre,
        ),
        T=t, d=d, R=r, ACT=act, BIAS_ROWS=bias is not None and bias.shape[0] > 1, R_PAD=r_pad,
    )  # fmt: skip
    return out, (z.new_empty(0) if pre is None else pre)


def fused_forward_ref(
    z, w_down, b_down, w_up, omega, source_index, bias, residual=None, row_scale=None, activation="relu",
    save_pre=False,
):
    """Plain-PyTorch ``fused_forward``: ``down_projection_ref`` then ``up_projection_ref``."""
    pre, hidden = down_projection_ref(z, w_down, b_down, source_index, row_scale, activation, save_pre)
    return up_projection_ref(hidden, w_up, omega, source_index, bias, residual), pre
