"""``scaled_adapter_sum``: the ScaLearn composition of N bottleneck adapters, the public functional.

    out = Σ_i ω_i ⊙ (W_up_i · act(W_down_i · z + b_down_i) + b_up_i) + residual

Each function checks its inputs (errors name the argument and the shapes), flattens leading
dims into rows, builds one ``Composition`` and hands it to ``ops/dispatch.py``: the custom op
``scalearn_fast::scaled_adapter_sum`` under ``torch.compile``, an ``autograd.Function`` in eager
mode, the backend directly when nothing needs a gradient. The ``reference`` backend is the
plain autograd loop and does not go through the op.
"""

from __future__ import annotations

import torch

from . import reference
from .backends import resolve_backend
from .composition import Composition
from .dispatch import infer, run
from .packing import (
    PackedSources,
    check_activation,
    check_folded_inputs,
    check_inputs,
    taking_weights,
)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rows(t: torch.Tensor | None, width: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1, width).contiguous()


def scaled_adapter_sum_packed(
    z: torch.Tensor,
    packed: PackedSources,
    omega: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    activation: str = "relu",
    backend: str = "auto",
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """ScaLearn composition ``Σ_i ω_i ⊙ A_i(z) + residual`` for ``z [..., d]``.

    Args:
        z: adapter input ``[..., d]``.
        packed: the N sources, packed by ``pack_sources``.
        omega: scales ``[N, d]`` (ScaLearn) or ``[N, 1]`` (uniform).
        residual: added to the output, same shape as ``z``.
        activation: the adapters' non-linearity (``relu`` for Pfeiffer adapters).
        backend: ``reference``, ``torch``, ``triton`` or ``auto``.
        row_scale: optional per-token source weights ``[..., N]`` (routers, gates).
    """
    if not isinstance(omega, torch.Tensor):
        raise ValueError(
            f"omega must be a tensor [N, d] or [N, 1]; got {type(omega).__name__} "
            "(scaled_adapter_sum_folded takes ω already applied to the up projections)"
        )
    check_activation(activation)
    check_inputs(z, packed, omega, residual, row_scale=row_scale)
    return compose_packed(
        z, packed, residual, activation=activation, backend=resolve_backend(backend, z.device),
        row_scale=row_scale, omega=omega,
    )  # fmt: skip


def compose_packed(
    z: torch.Tensor,
    packed: PackedSources,
    residual: torch.Tensor | None,
    *,
    activation: str,
    backend: str,
    row_scale: torch.Tensor | None = None,
    omega: torch.Tensor | None = None,
    omega_bank: torch.Tensor | None = None,
    task_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One differentiable call on checked inputs and a resolved backend: ``z [..., d]`` as rows,
    one ``Composition`` (coefficients ``omega``, or ``omega_bank`` with per-row ``task_index``),
    then the reference loop or ``dispatch.run``; the output in z's shape."""
    d, n = packed.hidden_size, packed.num_sources
    tensors = (
        z,
        packed.w_down,
        packed.b_down,
        packed.w_up,
        packed.b_up,
        omega,
        omega_bank,
        residual,
        row_scale,
    )
    call = Composition(
        z.reshape(-1, d).contiguous(), packed.w_down.contiguous(), packed.b_down.contiguous(),
        packed.w_up.contiguous(), packed.b_up.contiguous(), packed.source_index,
        None if omega is None else omega.contiguous(), None, None, _rows(row_scale, n), _rows(residual, d),
        activation, _needs_grad(*tensors),
        omega_bank=None if omega_bank is None else omega_bank.contiguous(),
        task_index=None if task_index is None else task_index.contiguous(),
    )  # fmt: skip
    if backend == "reference":  # the literal loop, differentiated by autograd
        return reference.compose(call, packed.ranks).reshape(z.shape)
    out, _ = run(call, backend)
    return out.reshape(z.shape)


def scaled_adapter_sum_folded(
    z: torch.Tensor,
    packed: PackedSources,
    folded_up: torch.Tensor,
    folded_bias: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    activation: str = "relu",
    backend: str = "auto",
) -> torch.Tensor:
    """The inference entry point on packed sources with ω already applied: ``folded_up [d, R]``
    and ``folded_bias [d]`` (``algebra.scale_up_projections``). Not differentiable."""
    if _needs_grad(z, residual, folded_up, folded_bias):
        raise RuntimeError("scaled_adapter_sum_folded is inference-only; call it under torch.no_grad()")
    check_activation(activation)
    check_folded_inputs(z, packed, folded_up, folded_bias, residual)
    backend = resolve_backend(backend, z.device)
    if backend == "reference":
        raise ValueError("scaled_adapter_sum_folded has no reference backend; use scaled_adapter_sum_packed")
    d = packed.hidden_size
    call = Composition(
        z.reshape(-1, d).contiguous(), packed.w_down.contiguous(), packed.b_down.contiguous(),
        packed.w_up, packed.b_up, packed.source_index,
        None, folded_up.contiguous(), folded_bias.reshape(d).contiguous(), None,
        _rows(residual, d), activation,
    )  # fmt: skip
    return infer(call, backend).reshape(z.shape)


scaled_adapter_sum = taking_weights(scaled_adapter_sum_packed, "scaled_adapter_sum")
