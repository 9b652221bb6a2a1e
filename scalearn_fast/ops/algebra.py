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
    return w_up * omega.index_select(0, source_index).T, (omega * b_up).sum(0)


def fp16_fold_overflows(w_up: Tensor, omega: Tensor, source_index: Tensor) -> bool:
    """Whether U = W ⊙ ω[s]ᵀ leaves fp16's finite range while W and ω are finite (a host sync:
    called only for fp16 operands)."""
    u = w_up.float() * omega.float().index_select(0, source_index).T
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


def unit_blocks(source_index: Tensor, num_sources: int) -> int | None:
    """r when the R units are N consecutive blocks of r units (equal ranks, laid out as
    ``pack_sources`` does), else ``None``. One host sync per ``source_index`` tensor, cached
    (``bank.source_columns``)."""
    total = source_index.numel()
    if num_sources == 0 or total % num_sources:
        return None
    from .bank import source_columns

    r = total // num_sources
    columns = source_columns(source_index, num_sources)
    return r if all(isinstance(c, slice) and c.stop - c.start == r for c in columns) else None


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
    summed over d for a uniform ω [N, 1]; in ω's dtype."""
    acc = torch.promote_types(m.dtype, torch.float32)
    per_unit = w_up.T.to(acc) * m.to(acc)  # [R, d]
    d_omega = torch.zeros(omega.shape[0], m.shape[1], dtype=acc, device=m.device)
    d_omega.index_add_(0, source_index, per_unit)
    d_omega += b_up.to(acc) * g_rows.to(acc)
    if omega.shape[1] == 1:
        d_omega = d_omega.sum(1, keepdim=True)
    return d_omega.to(omega.dtype)


def source_rows_of_grad(grad_out: Tensor, row_scale: Tensor | None, num_sources: int) -> Tensor:
    """g_rows[i] = Σ_t w[t, i]·g[t, :] [N, d] (w = 1 without ``row_scale``)."""
    if row_scale is None:
        return grad_out.sum(0, keepdim=True).expand(num_sources, -1)
    return row_scale.T @ grad_out
