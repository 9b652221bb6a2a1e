"""Kernels of the task-bank composition with a *vector* bank Ω [K, N, d] (``ops/bank.py``): every
row t has its own target task k(t), so its up projection is scaled by Ω[k(t)] instead of one ω.

Packed layout as ``scaled_adapter_sum.py`` (D [R, d], b_D [R], W [d, R], B [N, d]), with the units
of each source contiguous: ``bounds [N + 1]`` gives source i the units ``bounds[i] .. bounds[i+1]``
(``pack_sources`` packs them so). S = act(P) ⊙ w[:, s(·)] comes from the plain down projection.

    Y_i[t] = S[t, units of i]·W[:, units of i]ᵀ + w[t, i]·B_i                       [d]
    out[t] = Σ_i Ω[k(t), i] ⊙ Y_i[t] + residual[t]

How ω_k reaches the up GEMM: **per token, in the accumulator.** ``_bank_up_kernel``'s K-loop over
R is split at the sources' boundaries; each source's partial product Y_i is its own fp32
[BLOCK_T, BLOCK_D] accumulator, which is multiplied by its rows' Ω[k(t), i, j] (a gathered
[BLOCK_T, BLOCK_D] tile of the bank, read once per tile and source) and added to the output
accumulator. Nothing of size K·R·d (K folded copies of U) or N·T·d exists anywhere; the GEMM's
FLOPs are the plain up projection's, plus N multiply-adds of the accumulator tile.

Why not SGMV (sort the tokens by task, fold Ω[k] into the Uᵀ tile of each segment): the targets of
a serving batch are spread over many tasks. At K = 1024 tasks over 4096 tokens a segment averages
4 tokens, so each 16- or 64-row MMA tile of a segment would be 75-94% padding, and the sort would
permute z and out (two extra [T, d] passes) and need a segment table. Applying Ω per token costs
the same whatever K is and however the tasks are spread, with no sort and no host sync.

Backward (g = dL/dout; the O(T·R·d) products are kernels, the rest torch in ``ops/triton_bank.py``):

* ``_bank_grad_pre_kernel``: dP = (g ⊙ Ω[k(t), i])·W_i ⊙ act'(P) ⊙ w[:, i] per source i. Each
  program owns a column tile *inside one source* (grid axis 1 = source, axis 2 = tile of its
  units), so its A operand is the g tile scaled by one Ω row per token, in registers.
* ``_bank_omega_grad_kernel``: dΩ[k, i] = Σ_{t: k(t)=k} g[t] ⊙ Y_i[t], a segment sum over the
  rows of each task present. The rows are sorted by task (``perm``, ``seg_start``, ``seg_len``);
  program (slot, i, j-tile) recomputes Y_i of its task's rows tile by tile (S from the saved P in
  the prologue, as the forward rounded it) and reduces g ⊙ Y_i over them. It writes two fp32
  [K, N, d] sums, one for the units and one for the bias (Σ_{t: k(t)=k} w[t, i]·g[t]), so
  dΩ = units + B ⊙ bias and dB = Σ_k Ω ⊙ bias in torch. Each output row is written by one
  program: deterministic, no atomics; rows of tasks absent from the batch stay 0.

dz = dP·D and dD = dPᵀ·z are the plain kernels' (``up_projection`` and ``tn_gemm``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scalearn_fast.ops.activations import activation_id

from .common import (
    KernelOperands,
    check_operands,
    configs,
)
from .tiles import activation, activation_grad, load_tile, mma, store_tile, tile_mask

# a row of a table: the named tile sizes, then num_warps and num_stages (common.configs)
_UP_CONFIGS = configs("BLOCK_T BLOCK_D BLOCK_K", small=(16, 32, 16), full=[
    (128, 128, 16, 8, 3), (128, 64, 16, 4, 3), (64, 128, 32, 4, 4), (64, 64, 16, 4, 4),
])
_GRAD_PRE_CONFIGS = configs("BLOCK_T BLOCK_R BLOCK_K", small=(16, 16, 32), full=[
    (128, 16, 64, 4, 3), (128, 32, 64, 4, 3), (64, 64, 64, 4, 4),
])
_OMEGA_CONFIGS = configs("BLOCK_T BLOCK_D BLOCK_K", small=(16, 32, 16), full=[
    (32, 64, 16, 4, 3), (64, 64, 16, 4, 3), (16, 128, 16, 4, 3),
])


# --------------------------------------------------------------------------- kernels


@triton.autotune(configs=_UP_CONFIGS, key=["d", "R", "N"])
@triton.jit
def _bank_up_kernel(
    # tensors: S, up projection, source bounds, bank, task ids, up biases, row_scale, residual, output
    s_ptr, w_ptr, bounds_ptr, bank_ptr, task_ptr, b_up_ptr, rs_ptr, res_ptr, out_ptr,
    # sizes: tokens, hidden size, packed units, sources
    T, d, R, N,
    # strides (stride_<tensor>_<axis>)
    stride_s_t, stride_s_r, stride_w_d, stride_w_r, stride_bank_k, stride_bank_n, stride_bank_d,
    stride_b_up_n, stride_b_up_d, stride_rs_t, stride_rs_n, stride_res_t, stride_res_d,
    stride_out_t, stride_out_d,
    # absent inputs (common.KernelOperands)
    HAS_B_UP: tl.constexpr, HAS_RS: tl.constexpr, HAS_RES: tl.constexpr,
    # tiles (autotuned)
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    in_t = offs_t < T
    mask = tile_mask(offs_t, offs_j, T, d)
    task = tl.load(task_ptr + offs_t, mask=in_t, other=0)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for i in range(N):
        c0 = tl.load(bounds_ptr + i)
        c1 = tl.load(bounds_ptr + i + 1)
        y = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for k0 in range(c0, c1, BLOCK_K):
            kk = k0 + offs_k
            a = load_tile(s_ptr, offs_t, kk, stride_s_t, stride_s_r, tile_mask(offs_t, kk, T, c1))
            wt = load_tile(w_ptr, kk, offs_j, stride_w_r, stride_w_d, tile_mask(kk, offs_j, c1, d))
            y = mma(a, wt.to(a.dtype), y)
        if HAS_B_UP:  # + w[t, i]·B_i
            bias = tl.load(b_up_ptr + i * stride_b_up_n + offs_j * stride_b_up_d, mask=offs_j < d, other=0.0)
            if HAS_RS:
                w = tl.load(rs_ptr + offs_t.to(tl.int64) * stride_rs_t + i * stride_rs_n, mask=in_t, other=0)
                y += w.to(tl.float32)[:, None] * bias.to(tl.float32)[None, :]
            else:
                y += bias.to(tl.float32)[None, :]
        om = load_tile(bank_ptr + i * stride_bank_n, task, offs_j, stride_bank_k, stride_bank_d, mask)
        acc += om.to(tl.float32) * y  # Ω[k(t), i, j], per token, in registers
    if HAS_RES:
        acc += load_tile(res_ptr, offs_t, offs_j, stride_res_t, stride_res_d, mask).to(tl.float32)
    store_tile(out_ptr, acc, offs_t, offs_j, stride_out_t, stride_out_d, mask)


@triton.autotune(configs=_GRAD_PRE_CONFIGS, key=["d", "R", "N"])
@triton.jit
def _bank_grad_pre_kernel(
    # tensors: upstream gradient g, saved P, up projection, source bounds, bank, task ids, row_scale, dP
    g_ptr, pre_ptr, w_ptr, bounds_ptr, bank_ptr, task_ptr, rs_ptr, dpre_ptr,
    # sizes: tokens, hidden size, packed units, sources
    T, d, R, N,
    # strides (stride_<tensor>_<axis>)
    stride_g_t, stride_g_d, stride_pre_t, stride_pre_r, stride_w_d, stride_w_r,
    stride_bank_k, stride_bank_n, stride_bank_d, stride_rs_t, stride_rs_n, stride_dpre_t, stride_dpre_r,
    # absent inputs (common.KernelOperands), the activation id
    HAS_RS: tl.constexpr, ACT: tl.constexpr,
    # tiles (autotuned)
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(1)  # the source whose units this program owns
    c0 = tl.load(bounds_ptr + i)
    c1 = tl.load(bounds_ptr + i + 1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = c0 + tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    in_t = offs_t < T
    task = tl.load(task_ptr + offs_t, mask=in_t, other=0)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + offs_k
        m_td = tile_mask(offs_t, kk, T, d)
        a = load_tile(g_ptr, offs_t, kk, stride_g_t, stride_g_d, m_td)
        om = load_tile(bank_ptr + i * stride_bank_n, task, kk, stride_bank_k, stride_bank_d, m_td)
        a = (a.to(tl.float32) * om.to(tl.float32)).to(a.dtype)  # g ⊙ Ω[k(t), i], in registers
        u = load_tile(w_ptr, kk, offs_c, stride_w_d, stride_w_r, tile_mask(kk, offs_c, d, c1))
        acc = mma(a, u.to(a.dtype), acc)
    mask = tile_mask(offs_t, offs_c, T, c1)
    p = load_tile(pre_ptr, offs_t, offs_c, stride_pre_t, stride_pre_r, mask).to(tl.float32)
    dp = acc * activation_grad(p, ACT)
    if HAS_RS:
        w = tl.load(rs_ptr + offs_t.to(tl.int64) * stride_rs_t + i * stride_rs_n, mask=in_t, other=0.0)
        dp = dp * w.to(tl.float32)[:, None]
    store_tile(dpre_ptr, dp, offs_t, offs_c, stride_dpre_t, stride_dpre_r, mask)


@triton.autotune(configs=_OMEGA_CONFIGS, key=["d", "R", "N"])
@triton.jit
def _bank_omega_grad_kernel(
    # tensors: saved P, upstream gradient g, up projection, source bounds, rows sorted by task, each
    # slot's task (-1: none), each task's first sorted row and row count, row_scale, the two fp32 sums
    pre_ptr, g_ptr, w_ptr, bounds_ptr, perm_ptr, slot_task_ptr, seg_start_ptr, seg_len_ptr, rs_ptr,
    units_ptr, bias_ptr,
    # sizes: tokens, hidden size, packed units, sources
    T, d, R, N,
    # strides (stride_<tensor>_<axis>)
    stride_pre_t, stride_pre_r, stride_g_t, stride_g_d, stride_w_d, stride_w_r, stride_rs_t, stride_rs_n,
    stride_units_k, stride_units_n, stride_units_d, stride_bias_k, stride_bias_n, stride_bias_d,
    # absent inputs (common.KernelOperands), the activation id
    HAS_RS: tl.constexpr, ACT: tl.constexpr,
    # tiles (autotuned)
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    k = tl.load(slot_task_ptr + tl.program_id(0))
    i = tl.program_id(1)
    offs_j = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_tt = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    present = k >= 0
    k = tl.maximum(k, 0)
    start = tl.load(seg_start_ptr + k)
    end = start + tl.where(present, tl.load(seg_len_ptr + k), 0)
    c0 = tl.load(bounds_ptr + i)
    c1 = tl.load(bounds_ptr + i + 1)
    units = tl.zeros((BLOCK_D,), dtype=tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        in_seg = t0 + offs_tt < end
        rows = tl.load(perm_ptr + t0 + offs_tt, mask=in_seg, other=0)
        m_td = in_seg[:, None] & (offs_j < d)[None, :]
        g = load_tile(g_ptr, rows, offs_j, stride_g_t, stride_g_d, m_td)
        if HAS_RS:
            w = tl.load(rs_ptr + rows.to(tl.int64) * stride_rs_t + i * stride_rs_n, mask=in_seg, other=0.0)
            w = w.to(tl.float32)
        y = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for q0 in range(c0, c1, BLOCK_K):
            kk = q0 + offs_k
            m_tk = in_seg[:, None] & (kk < c1)[None, :]
            h = activation(load_tile(pre_ptr, rows, kk, stride_pre_t, stride_pre_r, m_tk).to(tl.float32), ACT)
            if HAS_RS:
                h = h * w[:, None]
            h = tl.where(m_tk, h, 0.0).to(g.dtype)  # S as the forward rounded it; never NaN·0 padding
            wt = load_tile(w_ptr, kk, offs_j, stride_w_r, stride_w_d, tile_mask(kk, offs_j, c1, d))
            y = mma(h, wt.to(g.dtype), y)
        g32 = g.to(tl.float32)
        units += tl.sum(g32 * y, axis=0)
        if HAS_RS:
            bias += tl.sum(g32 * w[:, None], axis=0)
        else:
            bias += tl.sum(g32, axis=0)
    m_j = offs_j < tl.where(present, d, 0)  # nothing stored for an empty slot
    k64 = k.to(tl.int64)
    tl.store(units_ptr + k64 * stride_units_k + i * stride_units_n + offs_j * stride_units_d, units, mask=m_j)
    tl.store(bias_ptr + k64 * stride_bias_k + i * stride_bias_n + offs_j * stride_bias_d, bias, mask=m_j)


# the kernels' tensors: name:axes (a vector has none), then the optional ones (HAS_<NAME> flags)
_UP_OPERANDS = KernelOperands("s:tr w:dr bounds bank:knd task out:td", optional="b_up:nd rs:tn res:td")
_GRAD_PRE_OPERANDS = KernelOperands("g:td pre:tr w:dr bounds bank:knd task dpre:tr", optional="rs:tn")
_OMEGA_OPERANDS = KernelOperands(
    "pre:tr g:td w:dr bounds perm slot_task seg_start seg_len units:knd bias:knd", optional="rs:tn"
)


# --------------------------------------------------------------------------- launchers


def _bank_operands(
    launcher: str, bounds: torch.Tensor, omega_bank: torch.Tensor, task_index: torch.Tensor, t: int, d: int
) -> tuple[int, torch.Tensor]:
    """The bank launchers' shared checks: the bank's shape and the task ids. Returns N and the bank
    as a [K, N, d] view (a uniform bank [K, N, 1] with stride 0 over d, no copy)."""
    if omega_bank.dim() != 3 or omega_bank.shape[2] not in (1, d):
        shape = list(omega_bank.shape)
        raise ValueError(f"{launcher}: omega_bank has shape {shape}, expected [K, N, d={d}] or [K, N, 1]")
    if task_index.dtype != torch.int64 or tuple(task_index.shape) != (t,):
        raise ValueError(
            f"{launcher}: task_index must be int64 [T={t}]; got {task_index.dtype} {list(task_index.shape)}"
        )
    bank = omega_bank.expand(-1, -1, d) if omega_bank.shape[2] == 1 else omega_bank
    return bounds.shape[0] - 1, bank


def bank_up_projection(
    hidden: torch.Tensor,
    w_up: torch.Tensor,
    bounds: torch.Tensor,
    omega_bank: torch.Tensor,
    task_index: torch.Tensor,
    b_up: torch.Tensor | None,
    row_scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out [T, d] = Σ_i Ω[k(t), i] ⊙ (S_i·W_iᵀ + w[:, i]·B_i) + residual`` for ``hidden`` = S [T, R].

    ``bounds`` [N + 1] int64: source i owns the units ``bounds[i] .. bounds[i+1]`` (sorted packing)."""
    check_operands("bank_up_projection", hidden=hidden, w_up=w_up)
    t, r = hidden.shape
    d = w_up.shape[0]
    n, bank = _bank_operands("bank_up_projection", bounds, omega_bank, task_index, t, d)
    out = hidden.new_empty(t, d)
    if t == 0:
        return out
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    _bank_up_kernel[grid](
        **_UP_OPERANDS(
            s=hidden, w=w_up, bounds=bounds, bank=bank, task=task_index, out=out,
            b_up=b_up, rs=row_scale, res=residual,
        ),
        T=t, d=d, R=r, N=n,
    )  # fmt: skip
    return out


def bank_up_projection_ref(hidden, w_up, bounds, omega_bank, task_index, b_up, row_scale=None, residual=None):
    """Plain-PyTorch ``bank_up_projection`` (fp32 math; materialises [T, d] per source)."""
    out = hidden.new_zeros(hidden.shape[0], w_up.shape[0], dtype=torch.float32)
    for i in range(bounds.shape[0] - 1):
        c0, c1 = int(bounds[i]), int(bounds[i + 1])
        y = hidden[:, c0:c1].float() @ w_up[:, c0:c1].float().T
        if b_up is not None:
            w = 1.0 if row_scale is None else row_scale[:, i : i + 1].float()
            y = y + w * b_up[i].float()
        out += omega_bank[:, i].float().index_select(0, task_index) * y
    if residual is not None:
        out += residual.float()
    return out.to(hidden.dtype)


def bank_grad_pre(
    grad_out: torch.Tensor,
    pre: torch.Tensor,
    w_up: torch.Tensor,
    bounds: torch.Tensor,
    max_rank: int,
    omega_bank: torch.Tensor,
    task_index: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    activation: str = "relu",
) -> torch.Tensor:
    """dP [T, R] (g's dtype) = ((g ⊙ Ω[k(t), i])·W_i) ⊙ act'(P) ⊙ w[:, i] per source i.
    ``max_rank`` is the largest r_i (the grid's tiles per source)."""
    check_operands("bank_grad_pre", grad_out=grad_out, w_up=w_up)
    t, d = grad_out.shape
    r = pre.shape[1]
    n, bank = _bank_operands("bank_grad_pre", bounds, omega_bank, task_index, t, d)
    d_pre = grad_out.new_empty(t, r)
    if t == 0 or r == 0:
        return d_pre
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), n, triton.cdiv(max_rank, meta["BLOCK_R"]))  # noqa: E731
    _bank_grad_pre_kernel[grid](
        **_GRAD_PRE_OPERANDS(
            g=grad_out, pre=pre, w=w_up, bounds=bounds, bank=bank, task=task_index,
            dpre=d_pre, rs=row_scale,
        ),
        T=t, d=d, R=r, N=n, ACT=activation_id(activation),
    )  # fmt: skip
    return d_pre


def bank_grad_pre_ref(grad_out, pre, w_up, bounds, max_rank, omega_bank, task_index, row_scale=None,
                      activation="relu"):  # fmt: skip
    """Plain-PyTorch ``bank_grad_pre`` (fp32 math)."""
    from scalearn_fast.ops.activations import activation_grad as act_grad

    g = grad_out.float()
    d_pre = torch.zeros(pre.shape, dtype=torch.float32, device=pre.device)
    for i in range(bounds.shape[0] - 1):
        c0, c1 = int(bounds[i]), int(bounds[i + 1])
        g_i = g * omega_bank[:, i].float().index_select(0, task_index)
        d_pre[:, c0:c1] = g_i @ w_up[:, c0:c1].float()
        if row_scale is not None:
            d_pre[:, c0:c1] *= row_scale[:, i : i + 1].float()
    return (d_pre * act_grad(activation, pre.float())).to(grad_out.dtype)


def task_segments(task_index: torch.Tensor, num_tasks: int) -> tuple[torch.Tensor, ...]:
    """The rows grouped by task, without a host sync: ``(perm, slot_task, seg_start, seg_len)``.
    ``perm`` [T] lists the rows sorted by task (stable); task k's rows are
    ``perm[seg_start[k] : seg_start[k] + seg_len[k]]``; ``slot_task`` [min(K, T)] lists the tasks
    present, then -1."""
    t = task_index.shape[0]
    device = task_index.device
    perm = torch.sort(task_index, stable=True).indices
    seg_len = torch.zeros(num_tasks, dtype=torch.int64, device=device)
    seg_len.index_add_(0, task_index, torch.ones_like(task_index))
    seg_start = torch.cumsum(seg_len, 0) - seg_len
    slots = max(1, min(num_tasks, t))
    present = seg_len > 0
    slot = torch.where(present, torch.cumsum(present, 0) - 1, slots)  # absent tasks -> the spare slot
    slot_task = torch.full((slots + 1,), -1, dtype=torch.int64, device=device)
    slot_task.scatter_reduce_(0, slot, torch.arange(num_tasks, device=device), "amax")
    slot_task[slots] = -1
    return perm, slot_task[:slots], seg_start, seg_len


def bank_omega_grad(
    pre: torch.Tensor,
    grad_out: torch.Tensor,
    w_up: torch.Tensor,
    bounds: torch.Tensor,
    task_index: torch.Tensor,
    num_tasks: int,
    row_scale: torch.Tensor | None = None,
    activation: str = "relu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(units, bias)``, both fp32 [K, N, d]: for each task k present and source i,
    units[k, i] = Σ_{t: k(t)=k} g[t] ⊙ (S_i·W_iᵀ)[t] and bias[k, i] = Σ_{t: k(t)=k} w[t, i]·g[t]
    (0 in the rows of absent tasks). dΩ = units + B ⊙ bias; dB = Σ_k Ω ⊙ bias."""
    check_operands("bank_omega_grad", pre=pre, grad_out=grad_out, w_up=w_up)
    t, d = grad_out.shape
    r = pre.shape[1]
    n = bounds.shape[0] - 1
    units = grad_out.new_zeros(num_tasks, n, d, dtype=torch.float32)
    bias = torch.zeros_like(units)
    if t == 0:
        return units, bias
    perm, slot_task, seg_start, seg_len = task_segments(task_index, num_tasks)
    grid = lambda meta: (slot_task.shape[0], n, triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    _bank_omega_grad_kernel[grid](
        **_OMEGA_OPERANDS(
            pre=pre, g=grad_out, w=w_up, bounds=bounds, perm=perm, slot_task=slot_task, seg_start=seg_start,
            seg_len=seg_len, units=units, bias=bias, rs=row_scale,
        ),
        T=t, d=d, R=r, N=n, ACT=activation_id(activation),
    )  # fmt: skip
    return units, bias


def bank_omega_grad_ref(
    pre, grad_out, w_up, bounds, task_index, num_tasks, row_scale=None, activation="relu"
):
    """Plain-PyTorch ``bank_omega_grad`` (fp32 math, S rounded to g's dtype as the kernel does)."""
    from scalearn_fast.ops.activations import activation_fn

    g = grad_out.float()
    n, d = bounds.shape[0] - 1, grad_out.shape[1]
    units = g.new_zeros(num_tasks, n, d)
    bias = g.new_zeros(num_tasks, n, d)
    h = activation_fn(activation, pre.float())
    for i in range(n):
        c0, c1 = int(bounds[i]), int(bounds[i + 1])
        w = None if row_scale is None else row_scale[:, i : i + 1].float()
        s = h[:, c0:c1] if w is None else h[:, c0:c1] * w
        y = s.to(grad_out.dtype).float() @ w_up[:, c0:c1].float().T
        units[:, i].index_add_(0, task_index, g * y)
        bias[:, i].index_add_(0, task_index, g if w is None else g * w)
    return units, bias
