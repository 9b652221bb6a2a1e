"""``lora_mixture``: N LoRA experts beside a Linear layer, weighted per token (MoSLD, routed PEFT LoRAs).

    out = scaling · Σ_n g_n · B_n · A_n · x          x [..., d_in] -> out [..., d_out]

- shared down (MoSLD): ``a_down [r, d_in]``, every ``A_n = A``; ``P = x·Aᵀ`` is ``[T, r]``,
  computed once, and never expanded to ``[T, N·r]`` in memory;
- per-expert down (PEFT sources): ``a_down [N·r, d_in]``, block n is ``A_n``; ``P`` is ``[T, N·r]``.

``b_up [N, d_out, r]``, ``gates [..., N]`` dense (zeros for experts outside the top-k).

The differentiable route is one ``torch.library`` custom op (``scalearn_fast::lora_mixture``,
with a fake implementation, so ``torch.compile`` traces it, ``fullgraph=True`` included) whose
autograd formula calls a second op for the backward. The op does the shrink ``P = x·Aᵀ`` itself
and hands everything after it to a backend's "expand" pair (``expand_functions``, the one place
that picks them). Saved for the backward: x, A, gates, B (inputs the caller holds anyway) and,
when the down matrix is shared, ``P [T, r]`` (r numbers a token, cheaper to keep than to
recompute at 2·d_in·r FLOPs a token). A per-expert ``P [T, N·r]`` is not kept: the backward
recomputes it from x with one GEMM. ``dA = dPᵀ·x`` is one GEMM in both cases. No ``[N, T, d]``
tensor exists anywhere.

``backend="reference"`` is the float64 per-expert loop (``lora_mixture_reference``) under plain
autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .backends import resolve_backend, triton_available
from .lora_mixture_reference import lora_mixture_reference

Tensor = torch.Tensor
ExpandFn = Callable[..., Tensor]
ExpandBackwardFn = Callable[..., tuple[Tensor | None, Tensor | None, Tensor | None]]

LORA_MIXTURE_BACKENDS = ("auto", "torch", "triton", "reference")


def expand_functions(backend: str, dtype: torch.dtype) -> tuple[ExpandFn, ExpandBackwardFn]:
    """The ``(lora_mixture_expand, lora_mixture_expand_backward)`` pair of a fused backend for
    tensors of ``dtype``: the one place where a backend's expand kernels are chosen."""
    if backend == "torch":
        from .lora_mixture_torch import lora_mixture_expand, lora_mixture_expand_backward

        return lora_mixture_expand, lora_mixture_expand_backward
    if backend == "triton":
        from .lora_mixture_triton import lora_mixture_expand, lora_mixture_expand_backward

        return lora_mixture_expand, lora_mixture_expand_backward
    raise ValueError(f"backend must be one of {LORA_MIXTURE_BACKENDS}; got {backend!r}")


def _resolve(backend: str, device: torch.device) -> str:
    """``auto``: the Triton kernels on CUDA when Triton is installed, else torch. ``triton``: a
    ValueError where it cannot run (no Triton; CPU tensors outside ``TRITON_INTERPRET=1``)."""
    if backend not in LORA_MIXTURE_BACKENDS:
        raise ValueError(f"backend must be one of {LORA_MIXTURE_BACKENDS}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return resolve_backend(backend, device)


def check_lora_mixture(x: Tensor, a_down: Tensor, b_up: Tensor, gates: Tensor, scaling: float) -> bool:
    """Whether the down matrix is shared (``a_down [r, d_in]``) rather than per expert
    (``[N·r, d_in]``); a ValueError naming the argument for any bad shape, dtype or device."""
    for name, t in (("x", x), ("a_down", a_down), ("b_up", b_up), ("gates", gates)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = getattr(t, "dtype", type(t).__name__)
            raise ValueError(f"{name} must be a floating-point tensor; got {got}")
    if b_up.dim() != 3 or min(b_up.shape) < 1:
        raise ValueError(f"b_up must be [N, d_out, r] with N, d_out, r >= 1; got shape {list(b_up.shape)}")
    n, _, r = b_up.shape
    if a_down.dim() != 2 or a_down.shape[0] not in (r, n * r):
        raise ValueError(
            f"a_down has shape {list(a_down.shape)}; expected [r, d_in] = [{r}, d_in] (shared) or "
            f"[N·r, d_in] = [{n * r}, d_in] (per expert), with N={n}, r={r} from b_up {list(b_up.shape)}"
        )
    if x.dim() < 1 or x.shape[-1] != a_down.shape[1]:
        raise ValueError(
            f"x has shape {list(x.shape)}: its last dim must be d_in={a_down.shape[1]} (a_down's columns)"
        )
    if tuple(gates.shape) != (*x.shape[:-1], n):
        raise ValueError(
            f"gates has shape {list(gates.shape)}, expected {[*x.shape[:-1], n]} (x's leading dims and N={n})"
        )
    for name, t in (("a_down", a_down), ("b_up", b_up), ("gates", gates)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} ({t.dtype}, {t.device}) must match x ({x.dtype}, {x.device})")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number (alpha / r); got {scaling!r}")
    return a_down.shape[0] == r


# ------------------------------------------------------------------ the custom ops


@torch.library.custom_op("scalearn_fast::lora_mixture", mutates_args=())
def _forward_op(
    x: Tensor, a_down: Tensor, gates: Tensor, b_up: Tensor, scaling: float, shared: bool, save_p: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    expand, _ = expand_functions(backend, x.dtype)
    p = torch.mm(x, a_down.T)
    out = expand(p, gates, b_up, scaling, shared=shared)
    return out, (p if save_p else x.new_empty(0))


@_forward_op.register_fake
def _(x, a_down, gates, b_up, scaling, shared, save_p, backend):
    return x.new_empty(x.shape[0], b_up.shape[1]), x.new_empty((x.shape[0], a_down.shape[0]) if save_p else 0)


@torch.library.custom_op("scalearn_fast::lora_mixture_backward", mutates_args=())
def _backward_op(
    grad_out: Tensor, x: Tensor, a_down: Tensor, gates: Tensor, b_up: Tensor, p: Tensor, scaling: float,
    shared: bool, backend: str, needs: list[bool],
) -> list[Tensor]:  # fmt: skip
    """``[dx, da_down, dgates, db_up]``, an empty tensor where ``needs`` is False."""
    _, expand_backward = expand_functions(backend, x.dtype)
    need_x, need_a, need_g, need_b = needs
    if p.numel() == 0 and x.shape[0] > 0:  # per expert: P [T, N·r] recomputed, not kept
        p = torch.mm(x, a_down.T)
    dp, dg, db = expand_backward(
        p, gates, b_up, grad_out, scaling, shared=shared, needs=(need_x or need_a, need_g, need_b)
    )
    dx = torch.mm(dp, a_down) if need_x else None
    da = torch.mm(dp.T, x) if need_a else None  # dA: one GEMM
    return [x.new_empty(0) if t is None else t for t in (dx, da, dg, db)]


@_backward_op.register_fake
def _(grad_out, x, a_down, gates, b_up, p, scaling, shared, backend, needs):
    inputs = (x, a_down, gates, b_up)
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip(inputs, needs, strict=True)]


def _setup_context(ctx, inputs, output) -> None:
    x, a_down, gates, b_up, scaling, shared, _save_p, backend = inputs
    _, p = output
    ctx.save_for_backward(x, a_down, gates, b_up, p)
    ctx.scaling, ctx.shared, ctx.backend = scaling, shared, backend
    ctx.mark_non_differentiable(p)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_p):
    if grad_out is None:
        return (None,) * 8
    x, a_down, gates, b_up, p = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    grads = torch.ops.scalearn_fast.lora_mixture_backward(
        grad_out.contiguous(), x, a_down, gates, b_up, p, ctx.scaling, ctx.shared, ctx.backend, needs
    )
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ entry point


def lora_mixture(
    x: Tensor, a_down: Tensor, b_up: Tensor, gates: Tensor, scaling: float, *, backend: str = "torch"
) -> Tensor:
    """``scaling · Σ_n gates[..., n] · B_n A_n x`` for ``x [..., d_in]`` -> ``[..., d_out]``.

    Args:
        x: the Linear layer's input ``[..., d_in]``.
        a_down: the down matrix, shared ``[r, d_in]`` or per expert ``[N·r, d_in]``.
        b_up: the experts' up matrices ``[N, d_out, r]``.
        gates: per-token expert weights ``[..., N]``, dense (zeros outside the top-k).
        scaling: ``alpha / r``.
        backend: ``torch`` (the fused op; float64 too), ``triton`` (the expand half in Triton
            kernels, ``ops/lora_mixture_triton.py``), ``auto`` (triton on CUDA when installed,
            else torch) or ``reference`` (the float64 loop).
    """
    shared = check_lora_mixture(x, a_down, b_up, gates, scaling)
    if backend == "reference":
        return lora_mixture_reference(x, a_down, b_up, gates, float(scaling))
    backend = _resolve(backend, x.device)
    n, d_out, _ = b_up.shape
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, a_down, b_up, gates))
    out, _ = torch.ops.scalearn_fast.lora_mixture(
        rows, a_down.contiguous(), gates.reshape(-1, n).contiguous(), b_up.contiguous(), float(scaling),
        shared, shared and grad, backend,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], d_out)
