"""The shared maths of the two-GEMM form, written once (docs/design.md, "The algebra").

With D [R, d], b_D [R], W [d, R], B [N, d], s [R] the source of each unit, ω [N, d|1] and an
optional per-row source weight w [T, N]:

    P    = z·Dᵀ + b_D                       down projection           [T, R]
    S    = act(P) ⊙ w[:, s]                 hidden units               [T, R]
    U    = W ⊙ ω[s]ᵀ                         ω applied to the up GEMM   [d, R]
    out  = S·Uᵀ + Σ_i w_i ω_i ⊙ B_i + residual

Backward, g = dL/dout, M = Sᵀ·g [R, d]:

    dω[i, j] = Σ_{c: s(c)=i} W[j, c]·M[c, j] + B[i, j]·Σ_t w[t, i]·g[t, j]

The torch backend uses every function here; the triton backend uses the O(R·d + N·d) ones
(the scaled bias, the per-source reductions) around its kernels.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .activations import activation_fn, activation_grad

Tensor = torch.Tensor


def scale_up_projections(
    w_up: Tensor, b_up: Tensor, omega: Tensor, source_index: Tensor
) -> tuple[Tensor, Tensor]:
    """U = W ⊙ ω[s]ᵀ [d, R] and Σ_i ω_i ⊙ B_i [d], in W's dtype.

    Half-precision weights are scaled in fp32 and rounded once. An fp16 product can still
    exceed the format's range (|ω·W| > 65504) where the loop's separate products do not; the
    result then holds ±inf and ``fits_dtype`` says so (callers fall back to fp32).
    """
    if w_up.dtype in (torch.float16, torch.bfloat16):
        u, bias = scale_up_projections(w_up.float(), b_up.float(), omega.float(), source_index)
        return u.to(w_up.dtype), bias.to(w_up.dtype)
    return scale_by_omega(w_up, omega, source_index), (omega * b_up).sum(0)


def scale_by_omega(w: Tensor, omega: Tensor, source_index: Tensor) -> Tensor:
    """W ⊙ ω[s]ᵀ for ``w [d, R]`` (unit c's column scaled by its source's ω, ``[N, d]`` or
    ``[N, 1]``), written in w's layout: a broadcast over w viewed as [d, N, r] when the sources
    have equal ranks, else ω's rows gathered as columns. (Multiplying by the transposed gather
    ``ω[s]ᵀ`` instead walks one operand across its strides: ~20x slower at R·d = 8M.)"""
    n = omega.shape[0]
    r = unit_blocks(source_index, n) if w.is_contiguous() else None
    if r is not None:
        return (w.view(w.shape[0], n, r) * omega.T.unsqueeze(-1)).view(w.shape)
    return w * omega.T.index_select(1, source_index)


def fp16_fold_overflows(w_up: Tensor, omega: Tensor, source_index: Tensor) -> bool:
    """Whether U = W ⊙ ω[s]ᵀ leaves fp16's finite range while W and ω are finite (a host sync:
    called only for fp16 operands)."""
    u = scale_by_omega(w_up.float(), omega.float(), source_index)
    finite_inputs = torch.isfinite(w_up).all() & torch.isfinite(omega).all()
    return bool(finite_inputs & (u.abs() > torch.finfo(torch.float16).max).any())


def scaled_bias_rows(b_up: Tensor, omega: Tensor, row_scale: Tensor | None) -> Tensor:
    """Σ_i ω_i ⊙ B_i [d], or with ``row_scale`` the per-row w·(ω ⊙ B) [T, d]."""
    scaled = omega * b_up
    return scaled.sum(0) if row_scale is None else row_scale @ scaled


def down_projection(z: Tensor, w_down: Tensor, b_down: Tensor) -> Tensor:
    """P = z·Dᵀ + b_D [..., R] (for rows, the same ``addmm`` as ``torch.addmm(b_D, z, Dᵀ)``)."""
    return F.linear(z, w_down, b_down)


def hidden_units(
    pre: Tensor, activation: str, source_index: Tensor, row_scale: Tensor | None, *, overwrite: bool
) -> Tensor:
    """S = act(P) ⊙ w[:, s]; with ``overwrite`` (inference) P's storage may be reused."""
    hidden = activation_fn(activation, pre, inplace=overwrite)
    if row_scale is None:
        return hidden
    in_place = overwrite or (hidden is not pre and not hidden.requires_grad)
    return scale_by_source(hidden, row_scale, source_index, inplace=in_place)


_BLOCKS: dict[int, tuple[weakref.ref, int, int | None]] = {}  # id(source_index) -> (ref, version, r)


def unit_blocks(source_index: Tensor, num_sources: int) -> int | None:
    """r when the R units are N consecutive blocks of r units (equal ranks, laid out as
    ``pack_sources`` does), else ``None``. One host sync per ``source_index`` tensor, cached
    while it is alive and unmodified; ``None`` while tracing (the gather forms serve there)."""
    total = source_index.numel()
    if num_sources == 0 or total % num_sources or torch.compiler.is_compiling():
        return None
    if source_index.is_inference():  # no version counter to key a cache on
        return _equal_blocks(source_index, total // num_sources)
    cached = _BLOCKS.get(id(source_index))
    if cached is not None and cached[0]() is source_index and cached[1] == source_index._version:
        return cached[2]
    r = _equal_blocks(source_index, total // num_sources)
    if len(_BLOCKS) > 256:
        _BLOCKS.clear()
    _BLOCKS[id(source_index)] = (weakref.ref(source_index), source_index._version, r)
    return r


def _equal_blocks(source_index: Tensor, r: int) -> int | None:
    expect = torch.arange(source_index.numel(), device=source_index.device) // r
    return r if torch.equal(source_index, expect) else None


def scale_by_source(x: Tensor, row_scale: Tensor, source_index: Tensor, *, inplace: bool) -> Tensor:
    """x ⊙ w[:, s] for ``x [T, R]`` and per-row source weights ``w [T, N]``: a broadcast over x
    viewed as [T, N, r] when the sources have equal ranks (no [T, R] copy of w's columns),
    else w's columns gathered; ``inplace`` overwrites x."""
    n = row_scale.shape[-1]
    r = unit_blocks(source_index, n) if x.is_contiguous() else None
    if r is not None:
        units, weights = x.view(*x.shape[:-1], n, r), row_scale.unsqueeze(-1)
        return (units.mul_(weights) if inplace else units * weights).view(x.shape)
    columns = row_scale.index_select(-1, source_index)
    return x.mul_(columns) if inplace else x * columns


def down_projection_grads(
    pre: Tensor,
    g_hidden: Tensor,
    activation: str,
    scale_cols: Tensor | None,
    z: Tensor,
    w_down: Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dz, dD, db_D) from the gradient of the hidden units ``g_hidden`` = ∂L/∂act(P)·w [T, R]:
    dP = g_hidden ⊙ w[:, s] ⊙ act'(P), dz = dP·D, dD = dPᵀ·z, db_D = Σ_t dP; ``needs`` flags
    which of the three to compute."""
    if activation == "relu":  # one pass (torch.where with a scalar is several times slower)
        d_pre = torch.ops.aten.threshold_backward(g_hidden, pre, 0)
    else:
        d_pre = g_hidden * activation_grad(activation, pre)
    if scale_cols is not None:
        d_pre = d_pre * scale_cols
    return unit_grads(d_pre, z, w_down, needs)


def unit_grads(
    d_pre: Tensor, z: Tensor, w_down: Tensor, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dz, dD, db_D) = (dP·D, dPᵀ·z, Σ_t dP) from dP [T, R]; ``needs`` flags which to compute."""
    need_z, need_wd, need_bd = needs
    return (
        d_pre @ w_down if need_z else None,
        d_pre.T @ z if need_wd else None,
        d_pre.sum(0) if need_bd else None,
    )


def segment_sum(values: Tensor, source_index: Tensor, num_sources: int) -> Tensor:
    """Sum the columns of ``values [T, R]`` that belong to the same source -> [T, N]."""
    r = unit_blocks(source_index, num_sources) if values.is_contiguous() else None
    if r is not None:  # equal ranks: a reduction over the [T, N, r] view
        return values.view(values.shape[0], num_sources, r).sum(-1)
    return values.new_zeros(values.shape[0], num_sources).index_add_(1, source_index, values)


def segment_dot(a: Tensor, b: Tensor, source_index: Tensor, num_sources: int) -> Tensor:
    """Σ_{c: s(c)=i} a[t, c]·b[t, c] for ``a, b [T, R]`` -> [T, N] (one pass when the sources
    have equal ranks)."""
    r = unit_blocks(source_index, num_sources) if a.is_contiguous() and b.is_contiguous() else None
    if r is not None:
        shape = (a.shape[0], num_sources, r)
        return torch.linalg.vecdot(a.view(shape), b.view(shape))
    return segment_sum(a * b, source_index, num_sources)


def omega_gradient(
    w_up: Tensor, m: Tensor, b_up: Tensor, g_rows: Tensor, source_index: Tensor, omega: Tensor
) -> Tensor:
    """dω from M = Sᵀ·g [R, d] and g_rows[i] = Σ_t w[t, i]·g[t, :] [N, d], reduced in ≥ fp32,
    summed over d for a uniform ω [N, 1]; in ω's dtype. W ⊙ Mᵀ is formed in W's [d, R] layout
    (free when M is the transposed view of a GEMM's [d, R] output, as the torch backend makes
    it; one blocked transpose otherwise)."""
    acc = torch.promote_types(m.dtype, torch.float32)
    per_unit = w_up.to(acc) * m.T.contiguous().to(acc)  # [d, R]
    d_omega = segment_sum(per_unit, source_index, omega.shape[0]).T  # [N, d]
    d_omega = d_omega + b_up.to(acc) * g_rows.to(acc)
    if omega.shape[1] == 1:
        d_omega = d_omega.sum(1, keepdim=True)
    return d_omega.to(omega.dtype)


def source_rows_of_grad(grad_out: Tensor, row_scale: Tensor | None, num_sources: int) -> Tensor:
    """g_rows[i] = Σ_t w[t, i]·g[t, :] [N, d] (w = 1 without ``row_scale``)."""
    if row_scale is None:
        return grad_out.sum(0, keepdim=True).expand(num_sources, -1)
    return row_scale.T @ grad_out
