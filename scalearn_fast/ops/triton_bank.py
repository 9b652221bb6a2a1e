"""The Triton backend's route for a *vector* task bank Ω [K, N, d] (``ops/bank.py``).

Forward: the plain down projection kernel (P, S), then ``bank_up_projection``, which applies each
row's Ω[k(t), i] to source i's partial up product in the GEMM's accumulator (kernels/task_bank.py
says how and why per token). Backward: dP from ``bank_grad_pre``, then dz = dP·D and dD = dPᵀ·z on
the plain kernels; dΩ (rows of the tasks present) and dB from ``bank_omega_grad``'s per-task
segment sums, finished in torch:

    dΩ[k, i] = units[k, i] + B_i ⊙ bias[k, i]        dB_i = Σ_k Ω[k, i] ⊙ bias[k, i]

Calls the kernels do not cover run ``torch_backend`` (the per-source loop): sources whose units
are not contiguous per source (``pack_sources`` always packs them so), and a backward that wants
dW_up (trained sources) or the row_scale gradient.
"""

from __future__ import annotations

import weakref

import torch

from scalearn_fast._kernels import load_kernels

from . import bank, torch_backend
from .composition import Composition, Gradients

Tensor = torch.Tensor

_BOUNDS: dict[int, tuple[weakref.ref, int, tuple[Tensor, int] | None]] = {}


def source_bounds(source_index: Tensor, num_sources: int) -> tuple[Tensor, int] | None:
    """``(bounds [N + 1] int64 on source_index's device, largest rank)`` when each source's units
    are contiguous and in source order, else None. Cached per ``source_index`` tensor (the host
    sync of ``bank.source_columns`` happens once)."""
    cached = _BOUNDS.get(id(source_index))
    if cached is not None and cached[0]() is source_index and cached[1] == source_index._version:
        return cached[2]
    columns = bank.source_columns(source_index, num_sources)
    info = None
    if all(isinstance(c, slice) for c in columns):
        edges = [c.start for c in columns] + [columns[-1].stop]
        bounds = torch.tensor(edges, dtype=torch.int64, device=source_index.device)
        info = (bounds, max(c.stop - c.start for c in columns))
    if len(_BOUNDS) > 256:
        _BOUNDS.clear()
    _BOUNDS[id(source_index)] = (weakref.ref(source_index), source_index._version, info)
    return info


def forward(call: Composition) -> tuple[Tensor, Tensor]:
    """``(out [T, d], pre [T, R] or empty)`` for a call with a vector bank."""
    info = source_bounds(call.source_index, call.num_sources)
    if info is None:
        return torch_backend.forward(call)
    k = load_kernels()
    z = call.z
    w_down, w_up = call.w_down.to(z.dtype), call.w_up.to(z.dtype)
    pre, hidden = k.down_projection(
        z, w_down, call.b_down, call.source_index, call.row_scale, call.activation, call.save_for_backward
    )
    out = k.bank_up_projection(
        hidden, w_up, info[0], call.omega_bank, call.task_index, call.b_up, call.row_scale, call.residual
    )
    return out, pre


def backward(call: Composition, pre: Tensor, grad_out: Tensor, needs: Gradients) -> Gradients:
    """The gradients flagged in ``needs`` for a call with a vector bank (see the module docstring)."""
    info = source_bounds(call.source_index, call.num_sources)
    if info is None or needs.w_up or needs.row_scale:
        return torch_backend.backward(call, pre, grad_out, needs)
    bounds, max_rank = info
    k = load_kernels()
    z, g, omega_bank, tasks = call.z, grad_out, call.omega_bank, call.task_index
    dtype = z.dtype
    w_down, w_up = call.w_down.to(dtype), call.w_up.to(dtype)
    d_z = d_wd = d_bd = d_bank = d_bu = None
    if needs.z or needs.w_down or needs.b_down:
        d_pre = k.bank_grad_pre(
            g, pre, w_up, bounds, max_rank, omega_bank, tasks, call.row_scale, call.activation
        )
        if needs.z:
            d_z = k.up_projection(d_pre, w_down.T, None, call.source_index, None)
        if needs.w_down:
            d_wd = k.tn_gemm(d_pre, z).to(call.w_down.dtype)
        if needs.b_down:
            d_bd = d_pre.float().sum(0).to(call.b_down.dtype)
    if needs.omega_bank or needs.b_up:
        units, bias = k.bank_omega_grad(
            pre, g, w_up, bounds, tasks, omega_bank.shape[0], call.row_scale, call.activation
        )
        if needs.omega_bank:
            d = units.add_(call.b_up.float() * bias)
            if bank.is_uniform(omega_bank):
                d = d.sum(2, keepdim=True)
            d_bank = d.to(omega_bank.dtype)
        if needs.b_up:
            d_bu = (omega_bank.float() * bias).sum(0).to(call.b_up.dtype)
    return Gradients(z=d_z, w_down=d_wd, b_down=d_bd, b_up=d_bu, omega_bank=d_bank)
