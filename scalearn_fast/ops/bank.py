"""A task bank's maths, written once: K target tasks' ω in one call (docs/design.md, "One formula").

With Ω [K, N, d|1] and the task k(t) of each row, row t is scaled by Ω[k(t)]:

    out[t] = Σ_i Ω[k(t), i] ⊙ w[t, i]·(W_i · act(D_i · z[t] + b_i) + B_i) + residual[t]

Two cases, by the bank's last dim:

- **uniform** [K, N, 1]: Ω[k(t), i] is a scalar per row and source, i.e. a per-row source weight.
  ``as_row_scale`` rewrites the call to ``row_scale = w ⊙ Ω[k(t), :, 0]`` with ω = 1, which every
  backend (and every Triton kernel) already runs; ``bank_gradients`` maps that call's row_scale
  gradient back to dΩ (scattered to the rows of the bank present) and dw.
- **vector** [K, N, d]: ``vector_forward`` runs per task present when the tasks average at least
  ``MIN_SEGMENT_ROWS`` rows (rows sorted by task; one full-width GEMM S_k·U_kᵀ per task with its
  own U_k = W ⊙ Ω[k][s]ᵀ, folded one task at a time), else loops over the N sources (not the K
  tasks): source i's up projection S_i·W_iᵀ [T, d] is computed once for the whole batch and
  scaled per row by Ω[k(t), i, :] (a [T, d] gather), accumulated into the output.
  ``vector_backward`` always loops over the sources. In memory at once: one folded U, or one
  [T, d] product and one [T, d] gather; never K scaled copies of W nor an [N, T, d] tensor.
  dΩ is an ``index_add`` over rows into the bank's shape.

Every operation is differentiable by autograd (a backward with ``create_graph=True`` goes through
these formulas).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import algebra
from .activations import activation_fn
from .composition import Composition, Gradients

Tensor = torch.Tensor

_COLUMNS: dict[int, tuple[weakref.ref, int, list]] = {}  # id(source_index) -> (ref, version, columns)


def is_uniform(omega_bank: Tensor) -> bool:
    """Whether the bank holds one scalar per task and source ([K, N, 1])."""
    return omega_bank.shape[-1] == 1


def source_columns(source_index: Tensor, num_sources: int) -> list[slice | Tensor]:
    """The columns (bottleneck units) of each source: slices when ``source_index`` is sorted (as
    ``pack_sources`` makes it), else index tensors. One host sync per ``source_index`` tensor,
    cached while it is alive and unmodified."""
    cached = _COLUMNS.get(id(source_index))
    if cached is not None and cached[0]() is source_index and cached[1] == source_index._version:
        return cached[2]
    ranks = torch.bincount(source_index, minlength=num_sources).tolist()
    if bool((source_index[1:] >= source_index[:-1]).all()):
        bounds, start = [], 0
        for r in ranks:
            bounds.append(slice(start, start + r))
            start += r
        columns: list[slice | Tensor] = bounds
    else:
        columns = [torch.nonzero(source_index == i).squeeze(1) for i in range(num_sources)]
    if len(_COLUMNS) > 256:
        _COLUMNS.clear()
    _COLUMNS[id(source_index)] = (weakref.ref(source_index), source_index._version, columns)
    return columns


def task_rows(omega_bank: Tensor, task_index: Tensor, source: int) -> Tensor:
    """Ω[k(t), source, :] for every row: [T, d] (or [T, 1] for a uniform bank)."""
    return omega_bank[:, source].index_select(0, task_index)


# ------------------------------------------------------------------ uniform banks: a row_scale


def as_row_scale(call: Composition) -> Composition:
    """The same call with a uniform bank turned into ``row_scale = w ⊙ Ω[k(t), :, 0]`` and ω = 1."""
    per_row = call.omega_bank[:, :, 0].index_select(0, call.task_index)  # [T, N]
    row_scale = per_row if call.row_scale is None else per_row * call.row_scale
    ones = call.b_up.new_ones(call.num_sources, 1)
    return call._replace(omega=ones, row_scale=row_scale.to(call.z.dtype), omega_bank=None, task_index=None)


def row_scale_needs(needs: Gradients) -> Gradients:
    """What the rewritten call must compute: its row_scale gradient carries dΩ and dw."""
    return needs._replace(omega=False, row_scale=bool(needs.row_scale or needs.omega_bank), omega_bank=False)


def bank_gradients(call: Composition, grads: Gradients, needs: Gradients) -> Gradients:
    """The original call's gradients from those of ``as_row_scale(call)``."""
    d_eff = grads.row_scale
    d_bank = d_rs = None
    if needs.omega_bank:
        src = d_eff if call.row_scale is None else d_eff * call.row_scale
        acc = torch.promote_types(src.dtype, torch.float32)
        d_bank = src.new_zeros(call.omega_bank.shape[:2], dtype=acc).index_add(
            0, call.task_index, src.to(acc)
        )
        d_bank = d_bank.unsqueeze(-1).to(call.omega_bank.dtype)
    if needs.row_scale:
        per_row = call.omega_bank[:, :, 0].index_select(0, call.task_index)
        d_rs = (d_eff * per_row).to(call.row_scale.dtype)
    return grads._replace(omega=None, row_scale=d_rs, omega_bank=d_bank)


# ------------------------------------------------------------------ vector banks: a loop over N


def _source_output(call: Composition, hidden: Tensor, cols: slice | Tensor, i: int) -> Tensor:
    """Y_i = S_i·W_iᵀ + w[:, i]·B_i [T, d] (S already carries w)."""
    w_up = call.w_up[:, cols]
    if call.row_scale is None:
        return F.linear(hidden[:, cols], w_up, call.b_up[i])
    return F.linear(hidden[:, cols], w_up) + call.row_scale[:, i : i + 1] * call.b_up[i]


MIN_SEGMENT_ROWS = 16
"""The per-task route runs when the tasks present average at least this many rows each."""


def _fold(w_up: Tensor, omega: Tensor, columns: list[slice | Tensor], source_index: Tensor) -> Tensor:
    """U = W ⊙ ω[s]ᵀ [d, R] for one task's ω [N, d]: a broadcast over [d, N, r] when every
    source has the same rank, else one [d, R] gather of ωᵀ (contiguous either way)."""
    d, n = w_up.shape[0], omega.shape[0]
    ranks = {c.stop - c.start for c in columns} if all(isinstance(c, slice) for c in columns) else set()
    if len(ranks) == 1:
        return (w_up.view(d, n, -1) * omega.T.unsqueeze(-1)).view(d, -1)
    return w_up * omega.T.index_select(1, source_index)


def _per_task_output(call: Composition, hidden: Tensor) -> Tensor | None:
    """``Σ_i Ω[k(t), i] ⊙ Y_i`` by task: rows sorted by task, then per task present one GEMM
    S_k·U_kᵀ with its own folded U_k (one at a time: never K copies) and its scaled bias. One
    full-width GEMM per task instead of N rank-r GEMMs and N [T, d] gathers of Ω; used when the
    tasks present average ``MIN_SEGMENT_ROWS`` rows or more (a host sync counts them), else None.
    Not for fp16 rows: a folded fp16 U may leave fp16's range where the loop's products do not."""
    if hidden.dtype == torch.float16:
        return None
    tasks = call.task_index
    t = tasks.shape[0]
    order = torch.sort(tasks, stable=True)
    present, counts = torch.unique_consecutive(order.values, return_counts=True)
    if present.shape[0] * MIN_SEGMENT_ROWS > t:
        return None
    columns = source_columns(call.source_index, call.num_sources)
    in_order = bool((order.indices[1:] > order.indices[:-1]).all()) if t > 1 else True
    rows = hidden if in_order else hidden.index_select(0, order.indices)
    w_rows = (
        call.row_scale
        if call.row_scale is None or in_order
        else call.row_scale.index_select(0, order.indices)
    )
    dtype = torch.promote_types(hidden.dtype, call.omega_bank.dtype)
    pieces, start = [], 0
    for k, n in zip(present.tolist(), counts.tolist(), strict=True):
        omega = call.omega_bank[k].to(dtype)
        u = _fold(call.w_up.to(dtype), omega, columns, call.source_index)
        scaled = omega * call.b_up.to(dtype)  # [N, d]
        seg = rows[start : start + n]
        if w_rows is None:
            pieces.append(torch.addmm(scaled.sum(0), seg, u.T))
        else:
            pieces.append(torch.addmm(w_rows[start : start + n] @ scaled, seg, u.T))
        start += n
    out = torch.cat(pieces)
    if not in_order:
        out = torch.empty_like(out).index_copy(0, order.indices, out)
    return out


def vector_forward(call: Composition) -> tuple[Tensor, Tensor | None]:
    """``(out [T, d], pre or None)`` for a call with a vector bank, rows only: per task present
    (``_per_task_output``) when the tasks average enough rows, else a loop over the N sources."""
    z = call.z
    pre = algebra.down_projection(z, call.w_down, call.b_down)
    keep_pre = call.save_for_backward or torch.is_grad_enabled() and pre.requires_grad
    hidden = algebra.hidden_units(
        pre, call.activation, call.source_index, call.row_scale, overwrite=not keep_pre
    )
    out = _per_task_output(call, hidden) if z.shape[0] else None
    if out is not None:
        out = out.to(z.dtype)
        return (out if call.residual is None else out + call.residual), (
            pre if call.save_for_backward else None
        )
    out = torch.zeros_like(z) if call.residual is None else call.residual
    for i, cols in enumerate(source_columns(call.source_index, call.num_sources)):
        y = _source_output(call, hidden, cols, i)
        out = torch.addcmul(out, task_rows(call.omega_bank, call.task_index, i).to(y.dtype), y)
    return out, (pre if call.save_for_backward else None)


def vector_backward(call: Composition, pre: Tensor, grad_out: Tensor, needs: Gradients) -> Gradients:
    """The gradients flagged in ``needs`` for a call with a vector bank, per source i with
    g_i = g ⊙ Ω[k(t), i] [T, d]:

        G[:, i]  = g_i·W_i          dW_i = g_iᵀ·S_i        dB_i = Σ_t w[t, i]·g_i[t]
        dw[t, i] = Σ_{c in i} act(P)[t, c]·G[t, c] + g_i[t]·B_i
        dΩ[k, i] = Σ_{t: k(t)=k} g[t] ⊙ Y_i[t]     (Y_i = S_i·W_iᵀ + w[t, i]·B_i)
    """
    g = grad_out
    row_scale, source_index, bank, tasks = call.row_scale, call.source_index, call.omega_bank, call.task_index
    n = call.num_sources
    act = activation_fn(call.activation, pre)
    scale_cols = None if row_scale is None else row_scale.index_select(1, source_index)
    hidden = act if scale_cols is None else act * scale_cols
    need_g_u = needs.z or needs.w_down or needs.b_down or needs.row_scale
    g_u = pre.new_zeros(pre.shape) if need_g_u else None
    d_wu = torch.zeros_like(call.w_up) if needs.w_up else None
    d_bu = [] if needs.b_up else None
    d_rs = [] if needs.row_scale else None
    d_bank = [] if needs.omega_bank else None
    acc = torch.promote_types(g.dtype, torch.float32)
    for i, cols in enumerate(source_columns(source_index, n)):
        coef = task_rows(bank, tasks, i).to(g.dtype)
        g_i = g * coef
        if need_g_u:
            g_u[:, cols] = g_i @ call.w_up[:, cols]
        if d_wu is not None:
            d_wu[:, cols] = g_i.T @ hidden[:, cols]
        if d_bu is not None:
            d_bu.append((g_i if row_scale is None else g_i * row_scale[:, i : i + 1]).sum(0))
        if d_rs is not None:
            d_rs.append((act[:, cols] * g_u[:, cols]).sum(1) + g_i @ call.b_up[i])
        if d_bank is not None:
            contrib = (g * _source_output(call, hidden, cols, i)).to(acc)
            if is_uniform(bank):
                contrib = contrib.sum(1, keepdim=True)
            d_bank.append(contrib.new_zeros(bank.shape[0], contrib.shape[1]).index_add(0, tasks, contrib))

    d_z = d_wd = d_bd = None
    if need_g_u:
        d_z, d_wd, d_bd = algebra.down_projection_grads(
            pre, g_u, call.activation, scale_cols, call.z, call.w_down, (needs.z, needs.w_down, needs.b_down)
        )
    return Gradients(
        z=d_z,
        w_down=d_wd,
        b_down=d_bd,
        w_up=d_wu,
        b_up=None if d_bu is None else torch.stack(d_bu),
        row_scale=None if d_rs is None else torch.stack(d_rs, 1).to(row_scale.dtype),
        omega_bank=None if d_bank is None else torch.stack(d_bank, 1).to(bank.dtype),
    )


BackwardFn = Callable[[Composition, Tensor, Tensor, Gradients], Gradients]


def forward(
    forward_fn: Callable[[Composition], tuple[Tensor, Tensor]], call: Composition
) -> tuple[Tensor, Tensor]:
    """A banked call's ``(out, pre)``: a uniform bank through ``forward_fn`` (a backend's forward)
    as a row_scale, a vector bank through ``vector_forward`` (torch)."""
    if is_uniform(call.omega_bank):
        return forward_fn(as_row_scale(call))
    out, pre = vector_forward(call)
    return out, (out.new_empty(0) if pre is None else pre)


def backward(
    backward_fn: BackwardFn, call: Composition, pre: Tensor, grad_out: Tensor, needs: Gradients
) -> Gradients:
    """A banked call's gradients (see ``forward``; ``backward_fn`` is a backend's backward)."""
    if is_uniform(call.omega_bank):
        grads = backward_fn(as_row_scale(call), pre, grad_out, row_scale_needs(needs))
        return bank_gradients(call, grads, needs)
    return vector_backward(call, pre, grad_out, needs)
