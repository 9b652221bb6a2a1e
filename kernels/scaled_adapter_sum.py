"""Forward kernels of ``scaled_adapter_sum`` (DESIGN.md §2) in the packed layout of
``scalearn_fast/ops/packing.py``: D [R, d], b_D [R], W [d, R], ω [N, d] or [N, 1],
source ids s(c) [R], optional per-token row_scale w [T, N].

    P   = z·Dᵀ + b_D                         [T, R]   (kept for backward when training)
    S   = act(P) ⊙ w[:, s(·)]                 [T, R]
    U   = W ⊙ ω[s(·)]ᵀ                        [d, R]   folded on the fly, never materialised
    out = S·Uᵀ + bias + residual              [T, d]

``bias`` is Σ_i ω_i ⊙ b_up_i  [d], or with row_scale the [T, d] tensor w·(ω ⊙ B); both are
O(N·d) / O(T·N·d) and computed in torch by the caller (the ``bias_rows`` flag says which).
On the inference path ω is already folded: W *is* U and ``fold=False`` skips the gather.

Kernels:

* ``_down_projection_kernel``: tiles [BLOCK_T, BLOCK_R] of P over a K-loop on d; writes P
  (training) and S in the input dtype.
* ``_up_projection_kernel``: tiles [BLOCK_T, BLOCK_D] of out over a K-loop on R; reads S and
  builds the matching tile of Uᵀ from W and ω[s(·)] in registers. With ``fold=False`` and no
  bias it is a plain ``A·Bᵀ`` GEMM, which the backward reuses for dz = dP·D.
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

All accumulation is fp32 (``input_precision="ieee"`` for fp32 operands so fp32 stays
accurate, the default tensor-core path otherwise); row offsets are int64 so T·d may pass
2³¹. Activations are constexpr: relu (NaN propagates like torch), gelu (exact erf),
silu, tanh, identity.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2, "tanh": 3, "identity": 4}
FUSED_MAX_R = 512  # largest next_pow2(R) the fused kernel keeps on chip (module-level: tests patch it)
FUSED_MAX_R_FP32 = 64  # the same for 4-byte operands (shared memory; see the module docstring)


def autotune_enabled() -> bool:
    """``SCALEARN_FAST_AUTOTUNE=0`` (tests) pins one small config; so does the interpreter
    (``TRITON_INTERPRET=1``), where the autotuner has no device to time configs on."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return os.environ.get("SCALEARN_FAST_AUTOTUNE", "1") != "0"


def _configs(full: list[tuple[dict, int, int]], small: dict) -> list[triton.Config]:
    if not autotune_enabled():
        return [triton.Config(small, num_warps=4, num_stages=1)]
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in full]


# Hopper-sensible tiles: 64/128-row tiles, K steps of 32/64, 4-8 warps, 3-4 stages.
_DOWN_CONFIGS = _configs(
    [
        ({"BLOCK_T": 128, "BLOCK_R": 64, "BLOCK_K": 64}, 4, 3),
        ({"BLOCK_T": 128, "BLOCK_R": 128, "BLOCK_K": 64}, 8, 3),
        ({"BLOCK_T": 64, "BLOCK_R": 64, "BLOCK_K": 64}, 4, 4),
        ({"BLOCK_T": 64, "BLOCK_R": 32, "BLOCK_K": 128}, 4, 3),
    ],
    {"BLOCK_T": 16, "BLOCK_R": 16, "BLOCK_K": 32},
)
_UP_CONFIGS = _configs(
    [
        ({"BLOCK_T": 128, "BLOCK_D": 128, "BLOCK_K": 32}, 8, 3),
        ({"BLOCK_T": 128, "BLOCK_D": 64, "BLOCK_K": 64}, 4, 3),
        ({"BLOCK_T": 64, "BLOCK_D": 128, "BLOCK_K": 64}, 4, 4),
        ({"BLOCK_T": 64, "BLOCK_D": 64, "BLOCK_K": 32}, 4, 4),
    ],
    {"BLOCK_T": 16, "BLOCK_D": 32, "BLOCK_K": 16},
)
_FUSED_CONFIGS = _configs(
    [
        ({"BLOCK_T": 64, "BLOCK_D": 64, "BLOCK_K": 64}, 4, 3),
        ({"BLOCK_T": 64, "BLOCK_D": 64, "BLOCK_K": 64}, 8, 2),
        ({"BLOCK_T": 64, "BLOCK_D": 32, "BLOCK_K": 32}, 8, 2),
        ({"BLOCK_T": 64, "BLOCK_D": 128, "BLOCK_K": 32}, 8, 3),
        ({"BLOCK_T": 128, "BLOCK_D": 64, "BLOCK_K": 32}, 8, 2),
        ({"BLOCK_T": 32, "BLOCK_D": 128, "BLOCK_K": 64}, 4, 3),
        ({"BLOCK_T": 32, "BLOCK_D": 64, "BLOCK_K": 64}, 8, 2),
        ({"BLOCK_T": 16, "BLOCK_D": 64, "BLOCK_K": 64}, 8, 2),
    ],
    {"BLOCK_T": 16, "BLOCK_D": 32, "BLOCK_K": 32},
)


def _prune_fused(configs, named_args, **kwargs):
    """Keep configs whose fp32 S block [BLOCK_T, R_PAD] is <= 128 registers a thread; for
    R_PAD = 512 that leaves BLOCK_T <= 64 at 8 warps. BLOCK_T = 64 is the smallest row tile of
    a Hopper wgmma; compiled for sm_90a at R_PAD = 512 (bf16, 8 warps, 2 stages) it takes 210
    registers, 200 KB of shared memory and no spills (scripts/sm90_resource_report.py), while
    the 4-warp version spills. Never prunes to nothing."""
    r_pad = {**named_args, **kwargs}["R_PAD"]
    fits = [c for c in configs if c.kwargs["BLOCK_T"] * r_pad <= 128 * 32 * c.num_warps]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_T"])]


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc += a·b; fp32 operands in exact IEEE fp32, others on the default path."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """act(x) in fp32: 0 relu, 1 gelu (erf), 2 silu, 3 tanh, 4 identity."""
    if ACT == 0:
        y = tl.where(x < 0, 0.0, x)  # NaN < 0 is false: NaN passes through, like torch.relu
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        y = x * tl.sigmoid(x)
    elif ACT == 3:
        y = _tanh(x)
    else:
        y = x
    return y


@triton.jit
def _activation_grad(x, ACT: tl.constexpr):
    """act'(x) in fp32, matching ``reference.activation_grad``."""
    if ACT == 0:
        y = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        y = cdf + x * pdf
    elif ACT == 2:
        sig = tl.sigmoid(x)
        y = sig * (1.0 + x * (1.0 - sig))
    elif ACT == 3:
        th = _tanh(x)
        y = 1.0 - th * th
    else:
        y = tl.zeros_like(x) + 1.0  # not x*0+1: a NaN P must not poison dP here
    return y


@triton.jit
def _load_ut_tile(
    w_ptr, omega_ptr, src_ptr, offs_c, offs_j, R, d,
    stride_w_d, stride_w_r, stride_om_n, stride_om_d,
    FOLD: tl.constexpr,
):
    """Uᵀ[c, j] = W[j, c]·ω[s(c), j] as an fp32 [len(offs_c), len(offs_j)] tile (0 outside)."""
    mask = (offs_c[:, None] < R) & (offs_j[None, :] < d)
    ut = tl.load(
        w_ptr + offs_c[:, None].to(tl.int64) * stride_w_r + offs_j[None, :].to(tl.int64) * stride_w_d,
        mask=mask, other=0.0,
    ).to(tl.float32)
    if FOLD:
        src = tl.load(src_ptr + offs_c, mask=offs_c < R, other=0)
        om = tl.load(
            omega_ptr + src[:, None] * stride_om_n + offs_j[None, :].to(tl.int64) * stride_om_d,
            mask=mask, other=0.0,
        ).to(tl.float32)
        ut = ut * om
    return ut


@triton.jit
def _down_tile(
    z_ptr, wd_ptr, bd_ptr, src_ptr, rs_ptr, pre_ptr, offs_t, offs_c, T, d, R,
    stride_z_t, stride_z_d, stride_wd_r, stride_wd_d, stride_rs_t, stride_rs_n, stride_p_t, stride_p_r,
    ACT: tl.constexpr, HAS_RS: tl.constexpr, SAVE_PRE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S = act(z·Dᵀ + b_D) ⊙ w[:, s(·)] as an fp32 [BLOCK_T, BLOCK_R] tile for rows ``offs_t`` and
    packed columns ``offs_c`` (K-loop over d); stores P = z·Dᵀ + b_D first when ``SAVE_PRE``."""
    rows = offs_t.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(
            z_ptr + rows[:, None] * stride_z_t + kk[None, :] * stride_z_d,
            mask=(offs_t[:, None] < T) & (kk[None, :] < d), other=0.0,
        )
        b = tl.load(
            wd_ptr + offs_c[None, :].to(tl.int64) * stride_wd_r + kk[:, None] * stride_wd_d,
            mask=(offs_c[None, :] < R) & (kk[:, None] < d), other=0.0,
        )
        acc = _mma(a, b, acc, IEEE)
    acc += tl.load(bd_ptr + offs_c, mask=offs_c < R, other=0.0).to(tl.float32)[None, :]
    mask = (offs_t[:, None] < T) & (offs_c[None, :] < R)
    if SAVE_PRE:
        tl.store(
            pre_ptr + rows[:, None] * stride_p_t + offs_c[None, :] * stride_p_r,
            acc.to(pre_ptr.dtype.element_ty), mask=mask,
        )
    h = _activation(acc, ACT)
    if HAS_RS:
        src = tl.load(src_ptr + offs_c, mask=offs_c < R, other=0)
        rs_offs = rows[:, None] * stride_rs_t + src[None, :] * stride_rs_n
        h = h * tl.load(rs_ptr + rs_offs, mask=mask, other=0.0)
    return h


@triton.jit
def _epilogue(
    acc, offs_t, offs_j, T, d, bias_ptr, res_ptr, out_ptr,
    stride_b_t, stride_r_t, stride_r_d, stride_o_t, stride_o_d,
    HAS_BIAS: tl.constexpr, BIAS_ROWS: tl.constexpr, HAS_RES: tl.constexpr,
):
    """out = acc + bias + residual, stored in out's dtype."""
    rows = offs_t.to(tl.int64)
    mask = (offs_t[:, None] < T) & (offs_j[None, :] < d)
    if HAS_BIAS:
        if BIAS_ROWS:
            acc += tl.load(bias_ptr + rows[:, None] * stride_b_t + offs_j[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
        else:
            acc += tl.load(bias_ptr + offs_j, mask=offs_j < d, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(
            res_ptr + rows[:, None] * stride_r_t + offs_j[None, :] * stride_r_d, mask=mask, other=0.0
        ).to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * stride_o_t + offs_j[None, :] * stride_o_d,
        acc.to(out_ptr.dtype.element_ty), mask=mask,
    )


# --------------------------------------------------------------------------- kernels


@triton.autotune(configs=_DOWN_CONFIGS, key=["d", "R"])
@triton.jit
def _down_projection_kernel(
    z_ptr, wd_ptr, bd_ptr, src_ptr, rs_ptr, pre_ptr, s_ptr,
    T, d, R,
    stride_z_t, stride_z_d, stride_wd_r, stride_wd_d,
    stride_rs_t, stride_rs_n, stride_p_t, stride_p_r, stride_s_t, stride_s_r,
    ACT: tl.constexpr, HAS_RS: tl.constexpr, SAVE_PRE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = _down_tile(
        z_ptr, wd_ptr, bd_ptr, src_ptr, rs_ptr, pre_ptr, offs_t, offs_c, T, d, R,
        stride_z_t, stride_z_d, stride_wd_r, stride_wd_d, stride_rs_t, stride_rs_n, stride_p_t, stride_p_r,
        ACT, HAS_RS, SAVE_PRE, IEEE, BLOCK_T, BLOCK_R, BLOCK_K,
    )
    rows = offs_t.to(tl.int64)
    tl.store(
        s_ptr + rows[:, None] * stride_s_t + offs_c[None, :] * stride_s_r,
        h.to(s_ptr.dtype.element_ty), mask=(offs_t[:, None] < T) & (offs_c[None, :] < R),
    )


@triton.autotune(configs=_UP_CONFIGS, key=["d", "R"])
@triton.jit
def _up_projection_kernel(
    s_ptr, w_ptr, omega_ptr, src_ptr, bias_ptr, res_ptr, out_ptr,
    T, d, R,
    stride_s_t, stride_s_r, stride_w_d, stride_w_r, stride_om_n, stride_om_d,
    stride_b_t, stride_r_t, stride_r_d, stride_o_t, stride_o_d,
    FOLD: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_ROWS: tl.constexpr, HAS_RES: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(
            s_ptr + rows[:, None] * stride_s_t + kk[None, :] * stride_s_r,
            mask=(offs_t[:, None] < T) & (kk[None, :] < R), other=0.0,
        )
        ut = _load_ut_tile(
            w_ptr, omega_ptr, src_ptr, kk, offs_j, R, d,
            stride_w_d, stride_w_r, stride_om_n, stride_om_d, FOLD,
        )
        acc = _mma(a, ut.to(a.dtype), acc, IEEE)
    _epilogue(
        acc, offs_t, offs_j, T, d, bias_ptr, res_ptr, out_ptr,
        stride_b_t, stride_r_t, stride_r_d, stride_o_t, stride_o_d, HAS_BIAS, BIAS_ROWS, HAS_RES,
    )


@triton.autotune(
    configs=_FUSED_CONFIGS, key=["d", "R"], prune_configs_by={"early_config_prune": _prune_fused}
)
@triton.jit
def _fused_kernel(
    z_ptr, wd_ptr, bd_ptr, w_ptr, omega_ptr, src_ptr, rs_ptr, bias_ptr, res_ptr, pre_ptr, out_ptr,
    T, d, R,
    stride_z_t, stride_z_d, stride_wd_r, stride_wd_d, stride_w_d, stride_w_r, stride_om_n, stride_om_d,
    stride_rs_t, stride_rs_n, stride_b_t, stride_r_t, stride_r_d, stride_p_t, stride_p_r,
    stride_o_t, stride_o_d,
    ACT: tl.constexpr, HAS_RS: tl.constexpr, SAVE_PRE: tl.constexpr, FOLD: tl.constexpr,
    BIAS_ROWS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, R_PAD)
    # first GEMM: S[BLOCK_T, R_PAD] = act(z·Dᵀ + b_D) ⊙ w[:, s(·)], K-loop over d
    h = _down_tile(
        z_ptr, wd_ptr, bd_ptr, src_ptr, rs_ptr, pre_ptr, offs_t, offs_c, T, d, R,
        stride_z_t, stride_z_d, stride_wd_r, stride_wd_d, stride_rs_t, stride_rs_n, stride_p_t, stride_p_r,
        ACT, HAS_RS, SAVE_PRE, IEEE, BLOCK_T, R_PAD, BLOCK_K,
    )
    # padded columns c >= R hold act(0)·0-weights: their Uᵀ rows are zero below
    s = h.to(z_ptr.dtype.element_ty)
    # second GEMM: sweep the output d tiles with S on chip
    for j0 in range(0, d, BLOCK_D):
        offs_j = j0 + tl.arange(0, BLOCK_D)
        ut = _load_ut_tile(
            w_ptr, omega_ptr, src_ptr, offs_c, offs_j, R, d,
            stride_w_d, stride_w_r, stride_om_n, stride_om_d, FOLD,
        )
        out = _mma(s, ut.to(s.dtype), tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32), IEEE)
        _epilogue(
            out, offs_t, offs_j, T, d, bias_ptr, res_ptr, out_ptr,
            stride_b_t, stride_r_t, stride_r_d, stride_o_t, stride_o_d, True, BIAS_ROWS, HAS_RES,
        )


# --------------------------------------------------------------------------- launchers


def _act_id(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {'/'.join(ACTIVATIONS)}; got {activation!r}")
    return ACTIVATIONS[activation]


def _omega_strides(omega: torch.Tensor | None) -> tuple[int, int]:
    if omega is None:
        return 0, 0
    return omega.stride(0), (0 if omega.shape[1] == 1 else omega.stride(1))  # [N, 1]: broadcast over d


def _fused_limit(dtype: torch.dtype | None) -> int:
    return FUSED_MAX_R_FP32 if dtype is not None and dtype.itemsize >= 4 else FUSED_MAX_R


def fused_fits(num_units: int, dtype: torch.dtype | None = None) -> bool:
    """Whether next_pow2(R) fits the fused kernel's on-chip S block for operands of ``dtype``
    (None: 2-byte operands)."""
    return max(16, triton.next_power_of_2(max(num_units, 1))) <= _fused_limit(dtype)


def _unit_stride(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The kernels index 1-D vectors (b_down, source_index, a ``[d]`` bias) and bias rows with
    unit stride: make them so (a no-op for the contiguous tensors the op layer passes)."""
    return tuple(None if x is None else x.contiguous() for x in tensors)


def _check_bias(bias: torch.Tensor | None, t: int, d: int) -> None:
    if bias is not None and tuple(bias.shape) not in ((d,), (t, d)):
        raise ValueError(f"bias has shape {list(bias.shape)}; expected [d={d}] or [T={t}, d={d}] (per row)")


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
    b_down, source_index = _unit_stride(b_down, source_index)
    t, d = z.shape
    r = w_down.shape[0]
    hidden = z.new_empty(t, r)
    pre = z.new_empty(t, r) if save_pre else z.new_empty(0)
    if t == 0 or r == 0:
        if r == 0:
            hidden.zero_()
        return pre, hidden
    rs = row_scale if row_scale is not None else z
    p_strides = (pre.stride(0), pre.stride(1)) if save_pre else (0, 0)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(r, meta["BLOCK_R"]))  # noqa: E731
    _down_projection_kernel[grid](
        z, w_down, b_down, source_index, rs, pre if save_pre else hidden, hidden,
        t, d, r,
        z.stride(0), z.stride(1), w_down.stride(0), w_down.stride(1),
        rs.stride(0), rs.stride(1), *p_strides, hidden.stride(0), hidden.stride(1),
        ACT=_act_id(activation), HAS_RS=row_scale is not None, SAVE_PRE=save_pre,
        IEEE=z.dtype == torch.float32,
    )
    return pre, hidden


def down_projection_ref(z, w_down, b_down, source_index, row_scale=None, activation="relu", save_pre=False):
    """Plain-PyTorch ``down_projection`` (fp32 math, outputs in z's dtype)."""
    from scalearn_fast.ops.reference import activation_fn

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
    t, r = hidden.shape
    d = w_up.shape[0]
    _check_bias(bias, t, d)
    source_index, bias = _unit_stride(source_index, bias)
    out = hidden.new_empty(t, d, dtype=out_dtype or hidden.dtype)
    if t == 0:
        return out
    bias_rows = bias is not None and bias.dim() == 2
    b = bias if bias is not None else out
    res = residual if residual is not None else out
    om = omega if omega is not None else out
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    _up_projection_kernel[grid](
        hidden, w_up, om, source_index, b, res, out,
        t, d, r,
        hidden.stride(0), hidden.stride(1), w_up.stride(0), w_up.stride(1), *_omega_strides(omega),
        b.stride(0) if bias_rows else 0, res.stride(0), res.stride(1), out.stride(0), out.stride(1),
        FOLD=omega is not None, HAS_BIAS=bias is not None, BIAS_ROWS=bias_rows, HAS_RES=residual is not None,
        IEEE=hidden.dtype == torch.float32,
    )
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
    bias: torch.Tensor,
    residual: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    activation: str = "relu",
    save_pre: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, d], P or empty)`` in one kernel, S kept on chip (needs ``fused_fits(R)``)."""
    t, d = z.shape
    r = w_down.shape[0]
    _check_bias(bias, t, d)
    b_down, source_index, bias = _unit_stride(b_down, source_index, bias)
    r_pad = max(16, triton.next_power_of_2(max(r, 1)))
    if r_pad > _fused_limit(z.dtype):
        raise ValueError(
            f"fused_forward keeps S on chip for next_pow2(R) <= {_fused_limit(z.dtype)} "
            f"with {z.dtype} operands; got R={r}"
        )
    out = z.new_empty(t, d)
    pre = z.new_empty(t, r) if save_pre else z.new_empty(0)
    if t == 0:
        return out, pre
    bias_rows = bias.dim() == 2
    res = residual if residual is not None else out
    rs = row_scale if row_scale is not None else z
    om = omega if omega is not None else out
    p_strides = (pre.stride(0), pre.stride(1)) if save_pre else (0, 0)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]),)  # noqa: E731
    _fused_kernel[grid](
        z, w_down, b_down, w_up, om, source_index, rs, bias, res, pre if save_pre else out, out,
        t, d, r,
        z.stride(0), z.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        *_omega_strides(omega), rs.stride(0), rs.stride(1), bias.stride(0) if bias_rows else 0,
        res.stride(0), res.stride(1), *p_strides, out.stride(0), out.stride(1),
        ACT=_act_id(activation), HAS_RS=row_scale is not None, SAVE_PRE=save_pre, FOLD=omega is not None,
        BIAS_ROWS=bias_rows, HAS_RES=residual is not None, IEEE=z.dtype == torch.float32, R_PAD=r_pad,
    )
    return out, pre


def fused_forward_ref(
    z, w_down, b_down, w_up, omega, source_index, bias, residual=None, row_scale=None, activation="relu",
    save_pre=False,
):
    """Plain-PyTorch ``fused_forward``: ``down_projection_ref`` then ``up_projection_ref``."""
    pre, hidden = down_projection_ref(z, w_down, b_down, source_index, row_scale, activation, save_pre)
    return up_projection_ref(hidden, w_up, omega, source_index, bias, residual), pre
