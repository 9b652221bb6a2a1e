"""``scaled_adapter_sum``: the ScaLearn composition of N bottleneck adapters.

    out = Σ_i ω_i ⊙ (W_up_i · act(W_down_i · z + b_down_i) + b_up_i) + residual

The fast backends are one ``torch.library`` custom op (``scalearn_fast::scaled_adapter_sum``)
with a fake implementation and a registered autograd formula, so ``torch.compile``
traces a model that uses it with no graph break. Its backward is a second custom op.
The ``reference`` backend is the plain autograd loop and does not go through the op.

In eager mode the same backend ``forward``/``backward`` run behind a plain
``torch.autograd.Function`` instead: the custom-op dispatch (argument binding, alias checks,
the autograd wrapper, a second op for the backward) costs more host time per call than the
small GEMMs of a typical layer take on a GPU, and a layer at the default shape is host-bound.
Both routes share ``_setup_context`` and ``_backward``; only the dispatch differs.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .backends import backend_module, resolve_backend
from .packing import (
    PackedSources,
    TensorOrList,
    check_activation,
    check_folded_inputs,
    check_inputs,
    pack_sources,
)
from .reference import scaled_adapter_sum_reference


@torch.library.custom_op("scalearn_fast::scaled_adapter_sum", mutates_args=())
def _scaled_adapter_sum_op(
    z: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    omega: torch.Tensor | None,
    source_index: torch.Tensor,
    residual: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    activation: str,
    backend: str,
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return backend_module(backend).forward(
        z, w_down, b_down, w_up, b_up, omega, source_index, residual, row_scale, activation, save_pre
    )


@_scaled_adapter_sum_op.register_fake
def _(z, w_down, b_down, w_up, b_up, omega, source_index, residual, row_scale, activation, backend, save_pre):
    pre_shape = (z.shape[0], w_down.shape[0]) if save_pre else (0,)
    return z.new_empty(z.shape), z.new_empty(pre_shape)


@torch.library.custom_op("scalearn_fast::scaled_adapter_sum_backward", mutates_args=())
def _scaled_adapter_sum_backward_op(
    grad_out: torch.Tensor,
    z: torch.Tensor,
    pre: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    omega: torch.Tensor,
    source_index: torch.Tensor,
    row_scale: torch.Tensor | None,
    activation: str,
    backend: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    return backend_module(backend).backward(
        grad_out, z, pre, w_down, w_up, b_up, omega, source_index, row_scale, activation, needs
    )


@_scaled_adapter_sum_backward_op.register_fake
def _(grad_out, z, pre, w_down, w_up, b_up, omega, source_index, row_scale, activation, backend, needs):
    like = (z, w_down, w_down[:, 0], w_up, b_up, omega, row_scale)
    return [
        t.new_empty(t.shape) if need else grad_out.new_empty(0) for t, need in zip(like, needs, strict=True)
    ]


# positions of the differentiable inputs of the forward op, in backward-op order
_GRAD_INPUTS = {"z": 0, "w_down": 1, "b_down": 2, "w_up": 3, "b_up": 4, "omega": 5, "row_scale": 8}


def _setup_context(ctx, inputs, output):
    z, w_down, _, w_up, b_up, omega, source_index, residual, row_scale, activation, backend, save_pre = inputs
    _, pre = output
    ctx.save_for_backward(z, pre, w_down, w_up, b_up, omega, source_index, row_scale)
    ctx.activation = activation
    ctx.backend = backend
    ctx.save_pre = save_pre
    ctx.eager = False
    ctx.mark_non_differentiable(pre)  # saved for backward only
    ctx.set_materialize_grads(False)  # so no [T, R] zeros are made for its (absent) gradient


def _backward(ctx, grad_out, _grad_pre):
    if grad_out is None:  # the output was not used (e.g. only its shape): nothing flows back
        return (None,) * 12
    z, pre, w_down, w_up, b_up, omega, source_index, row_scale = ctx.saved_tensors
    if not ctx.save_pre:
        raise RuntimeError(
            "scaled_adapter_sum ran without saving its activations (no input required grad "
            "when it was called); call it with grad enabled to differentiate it"
        )
    needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS.values()]
    args = (grad_out.contiguous(), z, pre, w_down, w_up, b_up, omega, source_index, row_scale)
    if ctx.eager:
        grads = backend_module(ctx.backend).backward(*args, ctx.activation, needs)
    else:
        grads = torch.ops.scalearn_fast.scaled_adapter_sum_backward(*args, ctx.activation, ctx.backend, needs)
    d_z, d_wd, d_bd, d_wu, d_bu, d_omega, d_rs = (
        g if need else None for g, need in zip(grads, needs, strict=True)
    )
    d_residual = grad_out if ctx.needs_input_grad[7] else None
    return d_z, d_wd, d_bd, d_wu, d_bu, d_omega, None, d_residual, d_rs, None, None, None


_scaled_adapter_sum_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerScaledAdapterSum(torch.autograd.Function):
    """The custom op's forward and autograd formula without the ``torch.library`` dispatch."""

    @staticmethod
    def forward(ctx, *args):  # the op's arguments; ctx-style (no per-call signature binding)
        output = backend_module(args[10]).forward(*args[:10], args[11])
        _setup_context(ctx, args, output)
        ctx.eager = True
        return output

    @staticmethod
    @once_differentiable  # like the op: no double backward (the Triton backward is not differentiable)
    def backward(ctx, grad_out, grad_pre):
        return _backward(ctx, grad_out, grad_pre)


def _run_op(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """The op for the positional ``args`` of ``scalearn_fast::scaled_adapter_sum``: traced as
    the custom op under ``torch.compile``, called through ``_EagerScaledAdapterSum`` otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.scalearn_fast.scaled_adapter_sum(*args)
    if not _needs_grad(*args[:9]):  # nothing to record: skip autograd altogether
        with torch.no_grad():
            return backend_module(args[10]).forward(*args[:10], args[11])
    return _EagerScaledAdapterSum.apply(*args)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    """``scaled_adapter_sum`` on sources already packed by ``pack_sources``."""
    check_activation(activation)
    check_inputs(z, packed, omega, residual, row_scale=row_scale)
    backend = resolve_backend(backend, z.device)
    if backend == "reference":
        return scaled_adapter_sum_reference(
            z, packed, omega, residual, activation=activation, row_scale=row_scale
        )
    d = packed.hidden_size
    lead = z.shape[:-1]
    save_pre = _needs_grad(
        z, packed.w_down, packed.b_down, packed.w_up, packed.b_up, omega, residual, row_scale
    )
    out, _ = _run_op(
        z.reshape(-1, d).contiguous(),
        packed.w_down.contiguous(),
        packed.b_down.contiguous(),
        packed.w_up.contiguous(),
        packed.b_up.contiguous(),
        omega.contiguous(),
        packed.source_index,
        None if residual is None else residual.reshape(-1, d).contiguous(),
        None if row_scale is None else row_scale.reshape(-1, packed.num_sources).contiguous(),
        activation,
        backend,
        save_pre,
    )
    return out.reshape(*lead, d)


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
    """Inference fast path: ω already folded into ``folded_up [d, R]`` and ``folded_bias [d]``
    (``torch_backend.fold_omega``). Not differentiable; the layer uses it in eval mode."""
    if _needs_grad(z, residual, folded_up, folded_bias):
        raise RuntimeError("scaled_adapter_sum_folded is inference-only; call it under torch.no_grad()")
    check_activation(activation)
    check_folded_inputs(z, packed, folded_up, folded_bias, residual)
    backend = resolve_backend(backend, z.device)
    if backend == "reference":
        raise ValueError("scaled_adapter_sum_folded has no reference backend; use scaled_adapter_sum_packed")
    d = packed.hidden_size
    lead = z.shape[:-1]
    out, _ = _run_op(
        z.reshape(-1, d).contiguous(),
        packed.w_down.contiguous(),
        packed.b_down.contiguous(),
        folded_up.contiguous(),
        folded_bias.reshape(1, d).contiguous(),
        None,
        packed.source_index,
        None if residual is None else residual.reshape(-1, d).contiguous(),
        None,
        activation,
        backend,
        False,
    )
    return out.reshape(*lead, d)


def scaled_adapter_sum(
    z: torch.Tensor,
    w_down: TensorOrList,
    b_down: TensorOrList,
    w_up: TensorOrList,
    b_up: TensorOrList,
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
        w_down, b_down, w_up, b_up: the N sources in nn.Linear layout, stacked
            (``[N, r, d]``, ``[N, r]``, ``[N, d, r]``, ``[N, d]``) or as per-source lists
            (heterogeneous r allowed).
        omega: scales ``[N, d]`` (ScaLearn) or ``[N, 1]`` (uniform).
        residual: added to the output, same shape as ``z``.
        activation: the adapters' non-linearity (``relu`` for Pfeiffer adapters).
        backend: ``reference``, ``torch``, ``triton`` or ``auto``.
        row_scale: optional per-token source weights ``[..., N]`` (routers, gates).
    """
    packed = pack_sources(w_down, b_down, w_up, b_up)
    return scaled_adapter_sum_packed(
        z, packed, omega, residual, activation=activation, backend=backend, row_scale=row_scale
    )
