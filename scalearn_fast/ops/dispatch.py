"""How a ``Composition`` reaches a backend: one ``torch.library`` custom op (traced by
``torch.compile``), one eager ``torch.autograd.Function`` (less host time per call), and one
inference entry point (``infer``) that the layers' eval path and ``scaled_adapter_sum_folded``
share.

Both differentiable routes are thin adapters over a backend's ``forward``/``backward``
(``ops/composition.py``). The op's schema and the positions of its inputs are generated from
``Composition``'s fields, so no position is written by hand anywhere:

    scalearn_fast::scaled_adapter_sum(<Composition's fields>, str backend) -> (out, pre)
    scalearn_fast::scaled_adapter_sum_backward(grad_out, pre, <fields>, str backend, bool[] needs)

Why two routes: the custom-op dispatch (argument binding, alias checks, the autograd wrapper,
a second op for the backward) costs more host time per call than the small GEMMs of a typical
layer take on a GPU, and a layer at the default shape is host-bound.

What a call keeps for its backward: its inputs and P [T, R], or, where ``ops/saved_state.py``
says P costs more memory than its recomputation is worth (R > d by default), its inputs only:
the forward then runs as an inference call and the backward recomputes P (one GEMM) before the
backend's backward. The rule applies to every backend in this one place.

Double backward (a gradient penalty, ``create_graph=True``) differentiates through the torch
backend's formulas (every one of them is a differentiable torch op), with the pre-activation
recomputed from the saved inputs, on every backend.
"""

from __future__ import annotations

import torch

from . import algebra, saved_state
from .backends import backend_module
from .composition import GRAD_FIELDS, TENSOR_FIELDS, Composition, Gradients, op_schema
from .packing import z_width_error
from .torch_backend import Runner, folded_runner
from .torch_backend import forward as _torch_forward
from .torch_backend import output as _torch_output

Tensor = torch.Tensor

_FIELD_POSITION = {name: i for i, name in enumerate(Composition._fields)}
_NUM_INPUTS = len(Composition._fields) + 1  # the fields, then the backend name
_RESIDUAL = _FIELD_POSITION["residual"]
_SAVED = frozenset(TENSOR_FIELDS) - {"residual", "scaled_up", "scaled_bias"}  # what backward reads


# ------------------------------------------------------------------ the custom ops


@torch.library.custom_op(
    "scalearn_fast::scaled_adapter_sum",
    mutates_args=(),
    schema=f"({op_schema()}, str backend) -> (Tensor, Tensor)",
)
def _forward_op(*args):
    *fields, backend = args
    return backend_module(backend).forward(_as_computed(Composition(*fields)))


@_forward_op.register_fake
def _(*args):
    call = Composition(*args[:-1])
    keeps_pre = call.save_for_backward and not call.recompute_pre
    pre_shape = (call.z.shape[0], call.w_down.shape[0]) if keeps_pre else (0,)
    return call.z.new_empty(call.z.shape), call.z.new_empty(pre_shape)


@torch.library.custom_op(
    "scalearn_fast::scaled_adapter_sum_backward",
    mutates_args=(),
    schema=f"(Tensor grad_out, Tensor pre, {op_schema()}, str backend, bool[] needs) -> Tensor[]",
)
def _backward_op(grad_out, pre, *args):
    *fields, backend, needs = args
    grads = backend_module(backend).backward(Composition(*fields), pre, grad_out, Gradients(*needs))
    return [grad_out.new_empty(0) if t is None else t for t in grads]  # one fresh empty each: no aliasing


@_backward_op.register_fake
def _(grad_out, pre, *args):
    *fields, _backend, needs = args
    call = Composition(*fields)
    return [
        getattr(call, name).new_empty(getattr(call, name).shape) if need else grad_out.new_empty(0)
        for name, need in zip(GRAD_FIELDS, needs, strict=True)
    ]


# ------------------------------------------------------------------ the autograd formula, shared


def _as_computed(call: Composition) -> Composition:
    """The call a backend's forward gets: one that recomputes P in its backward saves nothing."""
    return call._replace(save_for_backward=False) if call.recompute_pre else call


def _recomputed_pre(call: Composition) -> Tensor:
    """P = z·Dᵀ + b_D [T, R] in z's dtype, as the forward computed it (ops/saved_state.py)."""
    z = call.z
    return algebra.down_projection(z, call.w_down.to(z.dtype), call.b_down.to(z.dtype))


def _setup_context(ctx, inputs, output) -> None:
    """Save what the backward needs: the call's tensors and the pre-activation."""
    *fields, backend = inputs
    call = Composition(*fields)
    _, pre = output
    ctx.save_for_backward(*(getattr(call, name) if name in _SAVED else None for name in TENSOR_FIELDS), pre)
    ctx.activation = call.activation
    ctx.saved_pre = call.save_for_backward
    ctx.recompute_pre = call.recompute_pre
    ctx.backend = backend
    ctx.eager = False
    ctx.mark_non_differentiable(pre)  # saved for backward only
    ctx.set_materialize_grads(False)  # so no [T, R] zeros are made for its (absent) gradient


def _backward(ctx, grad_out, _grad_pre):
    if grad_out is None:  # the output was not used (e.g. only its shape): nothing flows back
        return (None,) * _NUM_INPUTS
    *tensors, pre = ctx.saved_tensors
    call = Composition(
        **dict(zip(TENSOR_FIELDS, tensors, strict=True)),
        activation=ctx.activation,
        save_for_backward=ctx.saved_pre,
        recompute_pre=ctx.recompute_pre,
    )
    needs = Gradients(*(ctx.needs_input_grad[_FIELD_POSITION[name]] for name in GRAD_FIELDS))
    if torch.is_grad_enabled():  # create_graph=True: differentiable formulas, P recomputed
        grads = _differentiable_backward(call, grad_out, needs)
    elif not ctx.saved_pre:
        raise RuntimeError(
            "scaled_adapter_sum ran without saving its activations (no input required grad "
            "when it was called); call it with grad enabled to differentiate it"
        )
    else:
        if ctx.recompute_pre:  # P was not kept (ops/saved_state.py): one GEMM brings it back
            pre = _recomputed_pre(call)
        grads = _backend_backward(ctx, call, pre, grad_out.contiguous(), needs)
    result: list[Tensor | None] = [None] * _NUM_INPUTS
    for name, grad in zip(GRAD_FIELDS, grads, strict=True):
        if getattr(needs, name):
            result[_FIELD_POSITION[name]] = grad
    if ctx.needs_input_grad[_RESIDUAL]:
        result[_RESIDUAL] = grad_out
    return tuple(result)


def _backend_backward(ctx, call: Composition, pre: Tensor, grad_out: Tensor, needs: Gradients) -> Gradients:
    """The backend's backward: directly in eager mode, through the backward custom op when traced."""
    if ctx.eager:
        return backend_module(ctx.backend).backward(call, pre, grad_out, needs)
    flat = torch.ops.scalearn_fast.scaled_adapter_sum_backward(grad_out, pre, *call, ctx.backend, list(needs))
    return Gradients(*(t if need else None for t, need in zip(flat, needs, strict=True)))


def _differentiable_backward(call: Composition, grad_out: Tensor, needs: Gradients) -> Gradients:
    from . import torch_backend

    return torch_backend.backward(call, _recomputed_pre(call), grad_out, needs)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerComposition(torch.autograd.Function):
    """The custom op's forward and autograd formula without the ``torch.library`` dispatch."""

    @staticmethod
    def forward(ctx, *inputs):  # the op's inputs: Composition's fields, then the backend name
        output = backend_module(inputs[-1]).forward(_as_computed(Composition(*inputs[:-1])))
        _setup_context(ctx, inputs, output)
        ctx.eager = True
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_pre):
        return _backward(ctx, grad_out, grad_pre)


# ------------------------------------------------------------------ entry points


def run(call: Composition, backend: str) -> tuple[Tensor, Tensor]:
    """``(out, pre)`` of ``call`` on a resolved fused backend: traced as the custom op under
    ``torch.compile``; in eager mode the autograd.Function when something needs a gradient
    (``call.save_for_backward``), else the backend itself. A call that saves for backward keeps
    P or recomputes it, as ``saved_state.recompute_pre`` decides for its shape (``pre`` is then
    empty). Under ``torch.export`` the torch backend's ATen operations, whatever the backend: a
    package cannot call back into Python."""
    if torch.compiler.is_exporting():
        return _torch_forward(call)
    if call.save_for_backward and saved_state.recompute_pre(call.w_down.shape[0], call.z.shape[-1]):
        call = call._replace(recompute_pre=True)
    if torch.compiler.is_compiling():
        return torch.ops.scalearn_fast.scaled_adapter_sum(*call, backend)
    if not call.save_for_backward:
        with torch.no_grad():
            return backend_module(backend).forward(call)
    return _EagerComposition.apply(*call, backend)


def infer(call: Composition, backend: str) -> Tensor:
    """The inference entry point: ``call``'s output, nothing saved. The caller guarantees that
    nothing needs a gradient (grad mode off, or no input requiring grad). ``call.z`` may be
    [..., d]: the torch backend takes it as is, the others get rows."""
    if backend == "torch" or torch.compiler.is_exporting():  # export: ATen only, as in ``run``
        return _torch_output(call)[0]
    z = call.z
    if z.dim() != 2:
        d = z.shape[-1]
        rows = call._replace(
            z=z.reshape(-1, d), residual=None if call.residual is None else call.residual.reshape(-1, d)
        )
        return infer(rows, backend).reshape(z.shape)
    if torch.compiler.is_compiling():
        return torch.ops.scalearn_fast.scaled_adapter_sum(*call, backend)[0]
    return backend_module(backend).forward(call)[0]


def inference_runner(call: Composition, backend: str) -> Runner:
    """``infer`` prepared once for calls that differ only in z and the residual:
    ``run(z, residual)`` equals ``infer(call._replace(z=z, residual=residual), backend)`` (``call.z``
    and ``call.residual`` are not read). The layers' eval path keeps one per cached plan. On the
    torch backend with ω applied beforehand and no per-row scale it is the torch backend's
    ``folded_runner``, the two GEMMs themselves: no ``Composition`` is made per call."""
    if (
        backend == "torch"
        and call.scaled_up is not None
        and call.row_scale is None
        and call.omega_bank is None
        and not call.save_for_backward
    ):
        return folded_runner(call.w_down, call.b_down, call.scaled_up, call.scaled_bias, call.activation)
    d = call.w_down.shape[1]
    replace = call._replace

    def run(z: Tensor, residual: Tensor | None) -> Tensor:
        if z.shape[-1] != d:
            raise z_width_error(z, d)
        return infer(replace(z=z, residual=residual), backend)

    return run
