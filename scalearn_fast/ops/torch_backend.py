"""The two-GEMM form in plain PyTorch (any device; the CPU default).

Forward (``algebra`` names the pieces):

    P   = z·Dᵀ + b_D                    [T, R]   pre-activation (saved for backward)
    S   = act(P) ⊙ w[:, s]              [T, R]   w = per-row row_scale, 1 if absent
    U   = W ⊙ ω[s]ᵀ                     [d, R]   or the call's scaled_up
    out = S·Uᵀ + w·(ω ⊙ B) + residual   [T, d]

Backward, g = dL/dout (docs/design.md, "The algebra"):

    G   = g·U                           [T, R]
    dP  = G ⊙ w[:, s] ⊙ act'(P)         → dz = dP·D,  dD = dPᵀ·z,  db_D = Σ_t dP
    M   = Sᵀ·g                          [R, d]   the one GEMM behind dω and dW
    dω  = algebra.omega_gradient(W, M, B, wᵀ·g)
    dW  = (M ⊙ ω[s])ᵀ,  dB = ω ⊙ (wᵀ·g)
    dw[t, i] = Σ_{c: s(c)=i} act(P)[t, c]·G[t, c] + Σ_j g[t, j]·ω_i[j]·B[i, j]

A task bank (``omega_bank``, ``task_index``) runs ``ops/bank.py``: a uniform bank as the
row_scale above, a vector bank as a loop over the N sources.

Only P (T x R) is kept for backward: O(T·N·r) memory, never N [T, d] outputs. Every operation
here is differentiable by autograd, so a backward run with ``create_graph=True`` (a gradient
penalty) differentiates through these formulas.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import algebra, bank
from .activations import activation_fn, overwriting_activation
from .composition import Composition, Gradients
from .packing import z_width_error

Tensor = torch.Tensor
Runner = Callable[[Tensor, Tensor | None], Tensor]


def forward(call: Composition) -> tuple[Tensor, Tensor]:
    """``(out [T, d], pre [T, R] or empty)``."""
    return _with_empty_pre(*output(call))


def _with_empty_pre(out: Tensor, pre: Tensor | None) -> tuple[Tensor, Tensor]:
    return out, (out.new_empty(0) if pre is None else pre)


def output(call: Composition) -> tuple[Tensor, Tensor | None]:
    """``forward`` without an empty stand-in for ``pre`` when nothing is saved (``None``): the
    inference entry point's route. z may also be [..., d] (rows are its leading dims), except
    with a task bank (rows only)."""
    if call.omega_bank is not None:  # ops/bank.py: a uniform bank is a row_scale
        if bank.is_uniform(call.omega_bank):
            return output(bank.as_row_scale(call))
        return bank.vector_forward(call)
    z, omega, row_scale = call.z, call.omega, call.row_scale
    if omega is None and row_scale is None and not call.save_for_backward:  # inference, ω applied
        run = folded_runner(call.w_down, call.b_down, call.scaled_up, call.scaled_bias, call.activation)
        return run(z, call.residual), None
    if (
        z.dtype == torch.float16
        and omega is not None
        and algebra.fp16_fold_overflows(call.w_up, omega, call.source_index)
    ):
        return _output_in_fp32(call)
    pre = algebra.down_projection(z, call.w_down, call.b_down)
    # P is needed again only when saved (or when autograd records this, for double backward)
    keep_pre = call.save_for_backward or torch.is_grad_enabled() and pre.requires_grad
    hidden = algebra.hidden_units(pre, call.activation, call.source_index, row_scale, overwrite=not keep_pre)
    if omega is None:
        u, bias = call.scaled_up, call.scaled_bias
    else:
        u, bias = algebra.scale_up_projections(call.w_up, call.b_up, omega, call.source_index)
    if row_scale is not None and omega is not None and z.dim() == 2:
        # the per-row bias w·(ω ⊙ B) and the residual accumulate into the GEMM's output
        out = torch.mm(hidden, u.T) if call.residual is None else torch.addmm(call.residual, hidden, u.T)
        return out.addmm_(row_scale, omega * call.b_up), (pre if call.save_for_backward else None)
    if row_scale is not None:
        bias = algebra.scaled_bias_rows(call.b_up, omega, row_scale)
    out = F.linear(hidden, u, bias)
    if call.residual is not None:
        out = out + call.residual if out.requires_grad else out.add_(call.residual)
    return out, (pre if call.save_for_backward else None)


def folded_runner(w_down: Tensor, b_down: Tensor, up: Tensor, bias: Tensor, activation: str) -> Runner:
    """Inference with ω applied beforehand, as a function of z [..., d] and the residual:

        run(z, residual) = act(z·Dᵀ + b_D)·Uᵀ + Σ_i ω_i ⊙ B_i (+ residual)

    two GEMMs, the activation in place on P and the residual added in place. Built once per
    set of weights (``dispatch.inference_runner``), a call is these four ATen calls and a check
    of z's last dim: the layers' eval path runs it on every layer of every step."""
    act = overwriting_activation(activation)
    d = w_down.shape[1]
    linear = F.linear

    def run(z: Tensor, residual: Tensor | None) -> Tensor:
        if z.shape[-1] != d:
            raise z_width_error(z, d)
        out = linear(act(linear(z, w_down, b_down)), up, bias)
        return out if residual is None else out.add_(residual)

    return run


def forward_in_fp32(call: Composition) -> tuple[Tensor, Tensor]:
    """``forward`` for fp16 operands whose ω-scaled up projection leaves fp16's range: the same
    sum in fp32, rounded once at the end (as the loop's separate products stay in range). The
    triton backend sends such calls here after its own check."""
    return _with_empty_pre(*_output_in_fp32(call))


def _output_in_fp32(call: Composition) -> tuple[Tensor, Tensor | None]:
    out, pre = output(_in_fp32(call))
    return out.to(call.z.dtype), (None if pre is None else pre.to(call.z.dtype))


def backward_in_fp32(call: Composition, pre: Tensor, grad_out: Tensor, needs: Gradients) -> Gradients:
    """The backward of ``forward_in_fp32``: the same formulas in fp32, each gradient rounded once."""
    grads = backward(_in_fp32(call), pre.float(), grad_out.float(), needs)
    return Gradients(
        *(
            None if g is None else g.to(getattr(call, name).dtype)
            for name, g in zip(Gradients._fields, grads, strict=True)
        )
    )


def _in_fp32(call: Composition) -> Composition:
    """``call`` with its floating-point tensors in fp32."""
    names = ("z", "w_down", "b_down", "w_up", "b_up", "omega", "row_scale", "residual", "omega_bank")
    return call._replace(**{n: None if (t := getattr(call, n)) is None else t.float() for n in names})


def backward(call: Composition, pre: Tensor, grad_out: Tensor, needs: Gradients) -> Gradients:
    """The gradients flagged in ``needs``; others ``None``."""
    if call.omega_bank is not None:
        return bank.backward(backward, call, pre, grad_out, needs)
    if grad_out.dtype == torch.float16 and algebra.fp16_fold_overflows(
        call.w_up, call.omega, call.source_index
    ):
        return backward_in_fp32(call, pre, grad_out, needs)
    g = grad_out
    omega, row_scale, source_index = call.omega, call.row_scale, call.source_index
    n = call.num_sources
    relu_gates = needs.row_scale and call.activation == "relu"  # their gradient reads P, not act(P)
    need_act = needs.omega or needs.w_up or (needs.row_scale and not relu_gates)
    act = activation_fn(call.activation, pre) if need_act else None
    if needs.omega or needs.b_up:
        g_rows = algebra.source_rows_of_grad(g, row_scale, n)

    d_z = d_wd = d_bd = d_wu = d_bu = d_omega = d_rs = None
    if needs.z or needs.w_down or needs.b_down or needs.row_scale:
        u, _ = algebra.scale_up_projections(call.w_up, call.b_up, omega, source_index)
        g_u = g @ u  # G = g·U  [T, R]
        unit_needs = (needs.z, needs.w_down, needs.b_down)
        in_place = not torch.is_grad_enabled()
        if relu_gates:  # act(P)·G = P·(G where P > 0): one mask pass
            d_pre = torch.ops.aten.threshold_backward(g_u, pre, 0)
            d_rs = algebra.segment_dot(pre, d_pre, source_index, n).addmm_(g, (omega * call.b_up).T)
            d_pre = algebra.scale_by_source(d_pre, row_scale, source_index, inplace=in_place)
            d_z, d_wd, d_bd = algebra.unit_grads(d_pre, call.z, call.w_down, unit_needs)
        else:
            if needs.row_scale:
                d_rs = algebra.segment_dot(act, g_u, source_index, n).addmm_(g, (omega * call.b_up).T)
            if row_scale is not None:  # G ⊙ w[:, s], then dP = that ⊙ act'(P)
                g_u = algebra.scale_by_source(g_u, row_scale, source_index, inplace=in_place)
            d_z, d_wd, d_bd = algebra.down_projection_grads(
                pre, g_u, call.activation, None, call.z, call.w_down, unit_needs
            )
    if needs.omega or needs.w_up:
        hidden = act
        if row_scale is not None:
            hidden = algebra.scale_by_source(act, row_scale, source_index, inplace=False)
        m_t = g.T @ hidden  # Mᵀ [d, R]: the one GEMM, in W's layout
        if needs.omega:
            d_omega = algebra.omega_gradient(call.w_up, m_t.T, call.b_up, g_rows, source_index, omega)
        if needs.w_up:
            d_wu = algebra.scale_by_omega(m_t, omega, source_index)
    if needs.b_up:
        d_bu = omega * g_rows
    return Gradients(d_z, d_wd, d_bd, d_wu, d_bu, d_omega, d_rs)
