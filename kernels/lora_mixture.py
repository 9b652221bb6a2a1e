"""The "expand" half of a LoRA mixture at one Linear site, forward and backward: T tokens,
N experts of rank r, d_in -> d_out, the shrink P = x·A_catᵀ already done (one GEMM, torch).

    p      P [T, r] (shared down matrix, MoSLD: P_n = P)  or  [T, N·r] (per expert: P_n = block n)
    gates  g [T, N] (dense; zeros for experts outside the top-k)
    b_up   B [N, d_out, r] (B_n = b_up[n]),  s = scaling (alpha / r)

    S      = the gated hidden, block n = g[:, n] · P_n                    [T, N·r]
    out    = s · S·B_catᵀ,  B_cat = [B_1 … B_N]                          [T, d_out]
    G_n    = grad_out·B_n                                                 [T, r]
    dp     = s · Σ_n g[:, n] · G_n  (shared)  or block n = s · g[:, n] · G_n
    dgates[:, n] = s · Σ_k G_n[:, k] · P_n[:, k]
    db_up[n] = s · (g[:, n] · grad_out)ᵀ · P_n                            [d_out, r]

Columns. The kernels index the N·r axis as c = n·R_PAD + k, with R_PAD = next_pow2(r): expert
n = c >> log2(R_PAD), unit k = c & (R_PAD - 1), and columns with k >= r are padding (loaded as
0, never stored). For the common ranks (1, 2, 4, 8, 16, …) nothing is padded; an awkward r
like 5 wastes 3 of every 8 columns of a dot. In exchange an expert never straddles a tile
whose width is a multiple of R_PAD, so per-expert sums (dgates) are a reshape and a sum.

S is never in memory. Every kernel that needs a tile of S builds it in registers from the
tile of P it loads (columns k, or n·r + k) and the gate column g[:, n] of each column, in
fp32, rounded to the operand dtype right before its ``tl.dot``: 2 loads and a multiply per
element against the r·d_out MACs per token the dot does with it. Materialising S would
write and re-read T·N·r elements (N times P's size when the down matrix is shared).

Kernels:

* ``_expand_kernel`` (forward): tiles [BLOCK_T, BLOCK_D] of out over a K-loop on the N·r
  columns; each step builds S[BLOCK_T, BLOCK_K] and loads B_catᵀ[BLOCK_K, BLOCK_D].
* ``_expand_grad_kernel`` (backward, dp and dgates): tiles [BLOCK_T, BLOCK_C] of
  G = grad_out·B_cat (columns as above) over a K-loop on d_out; the epilogue forms
  dgates (G ⊙ P_n summed per expert: reshape [BLOCK_T, BLOCK_C/R_PAD, R_PAD], sum the last
  axis) and dp (per expert: G ⊙ g[:, n]; shared: the same summed over the experts, the middle
  axis), from G in registers. BLOCK_C is the whole N·R_PAD axis up to ``C_TILE`` columns; past
  that the shared dp of each column tile is an fp32 partial [tiles, T, r] summed in torch
  (dgates needs none: experts do not straddle tiles). Needs R_PAD <= ``MAX_RANK``.
* ``_expand_db_kernel`` (backward, db_up): tiles [BLOCK_D, BLOCK_C] of grad_outᵀ·S, reducing
  over T with S built per token tile; like ``scaled_adapter_sum_backward.tn_gemm`` the T axis
  is split deterministically into fp32 partials [SPLIT, N, d_out, r] summed in torch in a
  fixed order (no atomics; a single split stores b_up's dtype directly).

Budget at a LLaMA site (d = 4096, r = 8, N = 8: N·R_PAD = 64), by reasoning, not measured:
the forward's K-loop is one or two steps (BLOCK_K 32-64) and its S tile [64, 64] fp32 is
16 KB of registers in a 4-warp program (32 a thread), on top of the [BLOCK_T, BLOCK_D]
accumulator; the grid is T/BLOCK_T x 4096/BLOCK_D, so S is rebuilt once per d_out tile, an
extra 64 P values and 8 gates read per token and tile (from L2) against 64·BLOCK_D MACs. The
grad kernel's whole G row block [BLOCK_T, 64] is one accumulator (64 x 64 fp32: 32
registers a thread at 4 warps), each K step stages grad_out [BLOCK_T, BLOCK_K] and B_cat
[BLOCK_K, 64] in shared memory: (64·64 + 64·64)·2 B = 16 KB a stage in bf16, 48 KB over
3 stages, far inside an H100/H200 block's 227 KB; the epilogue's reshapes are register
permutations of that block. db_up is 64 x 64 tiles of a [4096, 64] product, 64 tiles, so
the token split (up to 5 ways for ``TARGET_PROGRAMS`` = 264) is what fills the device.
Configs whose staged operand tiles would pass ``SMEM_BUDGET`` (fp32 operands at BLOCK_C = 256)
are pruned.

Vector loads. B tiles are gathers (column c reads b_up[n, j, k]); they load as vectors along
k only when the compiler can prove it: with r a power of two (``EXACT_R``) the k < r mask is
dropped, and with b_up's d_out stride a multiple of R_PAD (``D_ALIGNED``, checked by the
launcher) the row offsets are declared multiples of R_PAD. Compiled offline for sm_90a
(triton 3.9 + ptxas -v, no GPU; resource counts, not timings) at T = d_out = 4096, N = r = 8,
bf16, the listed configs use: forward 125-203 registers and 12-40 KB shared memory, grad
56-116 and 6-72 KB, db 102-188 and 32-56 KB; none spills, and all but the 32-row grad
config use Hopper wgmma. Without
those two facts the forward's B loads were scalar and three of its configs spilled; an
awkward r (5) still takes that path (224-255 registers, no spills). fp32 db tiles spill
(1.7-2.3 KB) in all but the smallest config (32 x 32 x 32, 242 registers), which is why
that one is listed.

Operands: p, b_up and grad_out share one dtype (float32, float16, bfloat16; float32 or
float16 under ``TRITON_INTERPRET=1``, ``common.check_operands``); gates may have its own.
Any strides are read as they are (nothing is copied). Accumulation is fp32 (``tiles.mma``);
out and dp come in p's dtype, dgates in gates', db_up in b_up's.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from .common import (
    KernelOperands,
    check_operands,
    check_same_dtype,
    configs,
    interpreting,
)
from .scaled_adapter_sum_backward import TOKEN_CHUNK, token_splits
from .tiles import load_tile, mma, store_tile, tile_mask

C_TILE = 128  # widest column tile of the grad kernel unless one expert is wider (tests patch it)
MAX_RANK = 256  # largest next_pow2(r) the grad kernel takes: one expert's columns are one tile
SMEM_BUDGET = 200 * 1024  # bytes of staged operand tiles a config may use (an H100/H200 block has 227 KB)

# a row of a table: the named tile sizes, then num_warps and num_stages (common.configs)
_EXPAND_CONFIGS = configs("BLOCK_T BLOCK_D BLOCK_K", small=(16, 32, 16), full=[
    (64, 64, 64, 4, 2), (64, 128, 64, 8, 2), (64, 64, 32, 4, 2), (128, 128, 32, 8, 2),
])
_GRAD_CONFIGS = configs("BLOCK_T BLOCK_K", small=(16, 32), full=[
    (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 8, 4), (32, 32, 4, 2),
])
# BLOCK_T must divide TOKEN_CHUNK so that each split is a whole number of T steps.
_DB_CONFIGS = configs("BLOCK_D BLOCK_C BLOCK_T", small=(32, 16, 16), full=[
    (64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 32, 128, 4, 3), (128, 128, 32, 8, 3), (32, 32, 32, 4, 2),
])


def _prune_grad(configs, named_args, **kwargs):
    """Keep configs whose staged grad_out [BLOCK_T, BLOCK_K] and B_cat [BLOCK_K, BLOCK_C] tiles
    fit ``SMEM_BUDGET`` (an estimate from tile sizes, not a compiled figure). Never prunes to
    nothing."""
    args = {**named_args, **kwargs}
    size = args["go_ptr"].element_size()
    block_c = args["BLOCK_C"]

    def smem(c):
        tile = c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_T"] + block_c)
        return tile * size * max(c.num_stages, 1)

    fits = [c for c in configs if smem(c) <= SMEM_BUDGET]
    return fits or [min(configs, key=smem)]


# --------------------------------------------------------------------------- tile helpers


@triton.jit
def _columns(c, N, R, R_PAD: tl.constexpr, EXACT_R: tl.constexpr):
    """Expert n, unit k and validity of each column c = n·R_PAD + k. With ``EXACT_R`` (r is a power
    of two) no column is padding, and the mask, constant over each expert's R_PAD columns, lets
    loads along k vectorise."""
    n = c // R_PAD
    k = c % R_PAD
    if EXACT_R:
        valid = n < N
    else:
        valid = (n < N) & (k < R)
    return n, k, valid


@triton.jit
def _p_columns(n, k, R, SHARED: tl.constexpr):
    """Column of P holding unit k of expert n: k (shared down matrix) or n·r + k."""
    if SHARED:
        pc = k
    else:
        pc = n * R + k
    return pc


@triton.jit
def _s_tile(
    p_ptr, gates_ptr, offs_t, c, T, N, R,
    stride_p_t, stride_p_r, stride_gates_t, stride_gates_n,
    SHARED: tl.constexpr, R_PAD: tl.constexpr, EXACT_R: tl.constexpr,
):  # fmt: skip
    """S[t, c] = g[t, n]·P_n[t, k] as an fp32 [len(offs_t), len(c)] tile, exactly 0 outside."""
    n, k, valid = _columns(c, N, R, R_PAD, EXACT_R)
    mask = (offs_t[:, None] < T) & valid[None, :]
    pv = load_tile(p_ptr, offs_t, _p_columns(n, k, R, SHARED), stride_p_t, stride_p_r, mask)
    gv = load_tile(gates_ptr, offs_t, n, stride_gates_t, stride_gates_n, mask)
    return pv.to(tl.float32) * gv.to(tl.float32)


@triton.jit
def _b_offsets(c, N, R, stride_n, stride_r, R_PAD: tl.constexpr, EXACT_R: tl.constexpr):
    """Offset of column c's (n, k) in a [N, d_out, r] tensor (d_out's stride apart), and its validity."""
    n, k, valid = _columns(c, N, R, R_PAD, EXACT_R)
    return n.to(tl.int64) * stride_n + k.to(tl.int64) * stride_r, valid


@triton.jit
def _d_offsets(offs_j, stride_d, R_PAD: tl.constexpr, D_ALIGNED: tl.constexpr):
    """offs_j·stride_d in int64, declared a multiple of R_PAD when ``D_ALIGNED`` (the launcher
    checked stride_d % R_PAD == 0): with the k offsets contiguous, loads and stores along k
    vectorise."""
    offs = offs_j.to(tl.int64) * stride_d
    if D_ALIGNED:
        offs = tl.multiple_of(offs, R_PAD)
    return offs


# --------------------------------------------------------------------------- kernels


@triton.autotune(configs=_EXPAND_CONFIGS, key=["D", "N", "R"])
@triton.jit
def _expand_kernel(
    # tensors: P, gates, b_up, out
    p_ptr, gates_ptr, b_ptr, out_ptr,
    # sizes: tokens, output width, experts, rank; the LoRA scaling
    T, D, N, R, scaling,
    # strides (stride_<tensor>_<axis>)
    stride_p_t, stride_p_r, stride_gates_t, stride_gates_n, stride_b_n, stride_b_d, stride_b_r,
    stride_out_t, stride_out_d,
    # one shared down matrix (P is [T, r]); next_pow2(r), r == R_PAD, stride_b_d % R_PAD == 0
    SHARED: tl.constexpr, R_PAD: tl.constexpr, EXACT_R: tl.constexpr, D_ALIGNED: tl.constexpr,
    # tiles (autotuned)
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_j = _d_offsets(offs_j, stride_b_d, R_PAD, D_ALIGNED)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, N * R_PAD, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        s = _s_tile(
            p_ptr, gates_ptr, offs_t, c, T, N, R,
            stride_p_t, stride_p_r, stride_gates_t, stride_gates_n, SHARED, R_PAD, EXACT_R,
        ).to(p_ptr.dtype.element_ty)  # fmt: skip
        off_c, valid = _b_offsets(c, N, R, stride_b_n, stride_b_r, R_PAD, EXACT_R)
        mask = valid[:, None] & (offs_j < D)[None, :]
        bt = tl.load(b_ptr + off_c[:, None] + col_j[None, :], mask=mask, other=0.0)  # B_catᵀ tile
        acc = mma(s, bt, acc)
    mask_out = tile_mask(offs_t, offs_j, T, D)
    store_tile(out_ptr, acc * scaling, offs_t, offs_j, stride_out_t, stride_out_d, mask_out)


@triton.autotune(
    configs=_GRAD_CONFIGS, key=["D", "N", "R"], prune_configs_by={"early_config_prune": _prune_grad}
)
@triton.jit
def _expand_grad_kernel(
    # tensors: grad_out, P, gates, b_up; outputs dp ([tiles, T, r] shared, [1, T, N·r] per expert), dgates
    go_ptr, p_ptr, gates_ptr, b_ptr, dp_ptr, dgates_ptr,
    # sizes: tokens, output width, experts, rank; the LoRA scaling
    T, D, N, R, scaling,
    # strides (stride_<tensor>_<axis>)
    stride_go_t, stride_go_d, stride_p_t, stride_p_r, stride_gates_t, stride_gates_n,
    stride_b_n, stride_b_d, stride_b_r, stride_dp_s, stride_dp_t, stride_dp_r,
    stride_dgates_t, stride_dgates_n,
    # outputs not wanted (common.KernelOperands)
    HAS_DP: tl.constexpr, HAS_DGATES: tl.constexpr,
    # one shared down matrix; next_pow2(r), r == R_PAD, stride_b_d % R_PAD == 0; columns a program
    # (a multiple of R_PAD)
    SHARED: tl.constexpr, R_PAD: tl.constexpr, EXACT_R: tl.constexpr, D_ALIGNED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    # tiles (autotuned)
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    off_c, valid = _b_offsets(c, N, R, stride_b_n, stride_b_r, R_PAD, EXACT_R)
    # G = grad_out·B_cat, K-loop over d_out
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j0 in range(0, D, BLOCK_K):
        jj = j0 + tl.arange(0, BLOCK_K)
        a = load_tile(go_ptr, offs_t, jj, stride_go_t, stride_go_d, tile_mask(offs_t, jj, T, D))
        mask_b = (jj < D)[:, None] & valid[None, :]
        row_j = _d_offsets(jj, stride_b_d, R_PAD, D_ALIGNED)
        b = tl.load(b_ptr + row_j[:, None] + off_c[None, :], mask=mask_b, other=0.0)
        acc = mma(a, b, acc)
    n, k, _ = _columns(c, N, R, R_PAD, EXACT_R)
    # masked to exactly 0 outside: a grad_out row of ±inf meets B's zero padding as inf·0 = NaN there
    mask = (offs_t[:, None] < T) & valid[None, :]
    g = acc * scaling
    if HAS_DGATES:  # s · Σ_k G_n ⊙ P_n, one sum per expert of the tile
        pv = load_tile(p_ptr, offs_t, _p_columns(n, k, R, SHARED), stride_p_t, stride_p_r, mask)
        gp = tl.where(mask, g * pv.to(tl.float32), 0.0)
        dgates = tl.sum(tl.reshape(gp, (BLOCK_T, BLOCK_C // R_PAD, R_PAD)), axis=2)
        ne = pid_c * (BLOCK_C // R_PAD) + tl.arange(0, BLOCK_C // R_PAD)
        mask_g = tile_mask(offs_t, ne, T, N)
        store_tile(dgates_ptr, dgates, offs_t, ne, stride_dgates_t, stride_dgates_n, mask_g)
    if HAS_DP:  # s · g_n ⊙ G_n, summed over the tile's experts when the down matrix is shared
        gv = load_tile(gates_ptr, offs_t, n, stride_gates_t, stride_gates_n, mask)
        gg = tl.where(mask, g * gv.to(tl.float32), 0.0)
        if SHARED:
            dp = tl.sum(tl.reshape(gg, (BLOCK_T, BLOCK_C // R_PAD, R_PAD)), axis=1)
            kk = tl.arange(0, R_PAD)
            part = dp_ptr + pid_c.to(tl.int64) * stride_dp_s
            store_tile(part, dp, offs_t, kk, stride_dp_t, stride_dp_r, tile_mask(offs_t, kk, T, R))
        else:
            store_tile(dp_ptr, gg, offs_t, n * R + k, stride_dp_t, stride_dp_r, mask)


@triton.autotune(configs=_DB_CONFIGS, key=["D", "N", "R"])
@triton.jit
def _expand_db_kernel(
    # tensors: grad_out, P, gates; output db_up partials [SPLIT, N, d_out, r]
    go_ptr, p_ptr, gates_ptr, part_ptr,
    # sizes: tokens, output width, experts, rank, tokens per split; the LoRA scaling
    T, D, N, R, chunk, scaling,
    # strides (stride_<tensor>_<axis>)
    stride_go_t, stride_go_d, stride_p_t, stride_p_r, stride_gates_t, stride_gates_n,
    stride_part_s, stride_part_n, stride_part_d, stride_part_r,
    # one shared down matrix; next_pow2(r), r == R_PAD (then stride_part_d % R_PAD == 0 too)
    SHARED: tl.constexpr, R_PAD: tl.constexpr, EXACT_R: tl.constexpr,
    # tiles (autotuned)
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(2)
    offs_j = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_start = pid_s.to(tl.int64) * chunk
    t_end = tl.minimum(t_start + chunk, T)
    acc = tl.zeros((BLOCK_D, BLOCK_C), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)  # int64
        mask_a = tile_mask(offs_j, tt, D, t_end)
        a = load_tile(go_ptr, offs_j, tt, stride_go_d, stride_go_t, mask_a)  # grad_outᵀ tile
        s = _s_tile(
            p_ptr, gates_ptr, tt, c, t_end, N, R,
            stride_p_t, stride_p_r, stride_gates_t, stride_gates_n, SHARED, R_PAD, EXACT_R,
        )  # fmt: skip
        acc = mma(a, s.to(a.dtype), acc)
    off_c, valid = _b_offsets(c, N, R, stride_part_n, stride_part_r, R_PAD, EXACT_R)
    part = part_ptr + pid_s.to(tl.int64) * stride_part_s
    offs = _d_offsets(offs_j, stride_part_d, R_PAD, EXACT_R)[:, None] + off_c[None, :]
    mask = (offs_j < D)[:, None] & valid[None, :]
    tl.store(part + offs, (acc * scaling).to(part_ptr.dtype.element_ty), mask=mask)


# the kernels' tensors: name:axes (a vector has none), then the optional ones (HAS_<NAME> flags)
_EXPAND_OPERANDS = KernelOperands("p:tr gates:tn b:ndr out:td")
_GRAD_OPERANDS = KernelOperands("go:td p:tr gates:tn b:ndr", optional="dp:str dgates:tn")
_DB_OPERANDS = KernelOperands("go:td p:tr gates:tn part:sndr")


# --------------------------------------------------------------------------- launchers


def _rank_pad(r: int) -> int:
    return triton.next_power_of_2(max(r, 1))


def backward_fits(r: int) -> bool:
    """Whether ``lora_mixture_expand_backward`` takes rank ``r`` (next_pow2(r) <= ``MAX_RANK``)."""
    return _rank_pad(r) <= MAX_RANK


def _rank_flags(r: int, shared: bool, b_up: torch.Tensor | None = None) -> dict[str, object]:
    """The column layout's constexprs; ``D_ALIGNED`` only where b_up's d_out stride is a multiple of R_PAD."""
    r_pad = _rank_pad(r)
    flags = {"SHARED": bool(shared), "R_PAD": r_pad, "EXACT_R": r == r_pad}
    if b_up is not None:
        flags["D_ALIGNED"] = b_up.stride(1) % r_pad == 0
    return flags


def _check(
    launcher: str,
    p: torch.Tensor,
    gates: torch.Tensor,
    b_up: torch.Tensor,
    scaling: float,
    shared: bool,
    grad_out: torch.Tensor | None = None,
) -> tuple[int, int, int, int]:
    """(T, N, d_out, r) after refusing, with a ValueError naming the argument, what the kernels
    cannot compute."""
    for name, x, dims in (("p", p, 2), ("gates", gates, 2), ("b_up", b_up, 3), ("grad_out", grad_out, 2)):
        if x is not None and x.dim() != dims:
            raise ValueError(f"{launcher}: {name} must be {dims}-D; got shape {list(x.shape)}")
    n, d_out, r = b_up.shape
    t = p.shape[0]
    if tuple(gates.shape) != (t, n):
        raise ValueError(
            f"{launcher}: gates has shape {list(gates.shape)}; expected [T={t}, N={n}] "
            f"(T from p {list(p.shape)}, N from b_up {list(b_up.shape)})"
        )
    width = r if shared else n * r
    if p.shape[1] != width:
        what = f"[T, r={r}] with shared=True" if shared else f"[T, N·r={n}·{r}={width}] with shared=False"
        raise ValueError(f"{launcher}: p has shape {list(p.shape)}; expected {what}, b_up {list(b_up.shape)}")
    if grad_out is not None and tuple(grad_out.shape) != (t, d_out):
        shape = list(grad_out.shape)
        raise ValueError(f"{launcher}: grad_out has shape {shape}; expected [T={t}, d_out={d_out}]")
    if not isinstance(scaling, numbers.Real):
        raise ValueError(f"{launcher}: scaling must be a real number; got {type(scaling).__name__}")
    check_operands(launcher, p=p, gates=gates, b_up=b_up, grad_out=grad_out)
    dot_operands = {"p": p, "b_up": b_up} | ({} if grad_out is None else {"grad_out": grad_out})
    check_same_dtype(launcher, **dot_operands)
    tensors = {"p": p, "gates": gates, "b_up": b_up} | ({} if grad_out is None else {"grad_out": grad_out})
    devices = {name: x.device for name, x in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{launcher}: tensors must be on one device; got {listed}")
    if p.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{launcher}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1); p is on {p.device}"
        )
    return t, n, d_out, r


def lora_mixture_expand(
    p: torch.Tensor, gates: torch.Tensor, b_up: torch.Tensor, scaling: float, *, shared: bool
) -> torch.Tensor:
    """``out [T, d_out] = scaling · S·B_catᵀ``, S block n = gates[:, n] · P_n formed in registers.

    ``p`` is [T, r] (``shared``) or [T, N·r]; ``gates`` [T, N]; ``b_up`` [N, d_out, r]. out is
    in p's dtype, accumulated in fp32. One launch."""
    t, n, d_out, r = _check("lora_mixture_expand", p, gates, b_up, scaling, shared)
    out = p.new_empty(t, d_out)
    if t == 0 or d_out == 0:
        return out
    if n == 0 or r == 0:
        return out.zero_()
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(d_out, meta["BLOCK_D"]))  # noqa: E731
    _expand_kernel[grid](
        **_EXPAND_OPERANDS(p=p, gates=gates, b=b_up, out=out),
        T=t, D=d_out, N=n, R=r, scaling=float(scaling), **_rank_flags(r, shared, b_up),
    )  # fmt: skip
    return out


def _token_splits(t: int, tiles: int) -> int:
    """How many deterministic T splits fill ~TARGET_PROGRAMS programs, each >= 2 chunks of tokens."""
    return token_splits(t, tiles, TOKEN_CHUNK)


def _grad_p_gates(p, gates, b_up, grad_out, scaling, shared, need_dp, need_dgates):
    t, n, d_out, r = p.shape[0], *b_up.shape
    r_pad = _rank_pad(r)
    block_c = max(r_pad, min(triton.next_power_of_2(n * r_pad), C_TILE), 16)
    tiles = triton.cdiv(n * r_pad, block_c)
    dgates = gates.new_empty(t, n) if need_dgates else None
    dp = dp_out = None
    if need_dp:
        if not shared:
            dp_out = p.new_empty(t, n * r)
            dp = dp_out.unsqueeze(0)
        elif tiles == 1:
            dp_out = p.new_empty(t, r)
            dp = dp_out.unsqueeze(0)
        else:  # fp32 partials, one per column tile, summed below
            dp = p.new_empty(tiles, t, r, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), tiles)  # noqa: E731
    _expand_grad_kernel[grid](
        **_GRAD_OPERANDS(go=grad_out, p=p, gates=gates, b=b_up, dp=dp, dgates=dgates),
        T=t, D=d_out, N=n, R=r, scaling=float(scaling), BLOCK_C=block_c, **_rank_flags(r, shared, b_up),
    )  # fmt: skip
    if need_dp and dp_out is None:
        dp_out = dp.sum(0).to(p.dtype)
    return dp_out, dgates


def _grad_b_up(p, gates, b_up, grad_out, scaling, shared):
    t, n, d_out, r = p.shape[0], *b_up.shape
    r_pad = _rank_pad(r)
    splits = _token_splits(t, triton.cdiv(d_out, 64) * triton.cdiv(n * r_pad, 64))
    chunk = triton.cdiv(triton.cdiv(t, splits), TOKEN_CHUNK) * TOKEN_CHUNK
    splits = triton.cdiv(t, chunk)
    if splits == 1:
        db = b_up.new_empty(n, d_out, r)
        part = db.unsqueeze(0)
    else:
        part = b_up.new_empty(splits, n, d_out, r, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(d_out, meta["BLOCK_D"]), triton.cdiv(n * r_pad, meta["BLOCK_C"]), splits)  # noqa: E731
    _expand_db_kernel[grid](
        **_DB_OPERANDS(go=grad_out, p=p, gates=gates, part=part),
        T=t, D=d_out, N=n, R=r, chunk=chunk, scaling=float(scaling), **_rank_flags(r, shared),
    )  # fmt: skip
    return db if splits == 1 else part.sum(0).to(b_up.dtype)


def lora_mixture_expand_backward(
    p: torch.Tensor,
    gates: torch.Tensor,
    b_up: torch.Tensor,
    grad_out: torch.Tensor,
    scaling: float,
    *,
    shared: bool,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dp, dgates, db_up)`` of ``lora_mixture_expand``, each None where ``needs`` says so.

    dp [T, r] or [T, N·r] in p's dtype, dgates [T, N] in gates', db_up [N, d_out, r] in b_up's.
    dp and dgates come from one kernel (G = grad_out·B_cat in registers, never stored), db_up
    from a second (S built per token tile). Needs next_pow2(r) <= ``MAX_RANK``."""
    if len(needs) != 3:
        raise ValueError(f"lora_mixture_expand_backward: needs is (dp, dgates, db_up); got {needs!r}")
    t, n, d_out, r = _check("lora_mixture_expand_backward", p, gates, b_up, scaling, shared, grad_out)
    if not backward_fits(r):
        raise ValueError(
            f"lora_mixture_expand_backward: r={r} (b_up {list(b_up.shape)}) is past the kernels' "
            f"next_pow2(r) <= {MAX_RANK}; use the torch implementation"
        )
    need_dp, need_dgates, need_db = (bool(x) for x in needs)
    empty = t == 0 or n == 0 or r == 0 or d_out == 0
    dp = dgates = db = None
    if need_dp or need_dgates:
        if empty:
            dp = p.new_zeros(p.shape) if need_dp else None
            dgates = gates.new_zeros(gates.shape) if need_dgates else None
        else:
            dp, dgates = _grad_p_gates(p, gates, b_up, grad_out, scaling, shared, need_dp, need_dgates)
    if need_db:
        db = b_up.new_zeros(b_up.shape) if empty else _grad_b_up(p, gates, b_up, grad_out, scaling, shared)
    return dp, dgates, db
