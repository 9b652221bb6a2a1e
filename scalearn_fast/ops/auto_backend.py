"""``backend="auto"`` on CUDA: per shape class, the faster of the Triton kernels and the
two GEMMs on cuBLAS (the torch backend), measured on the device.

Both backends compute the same function with the same saved state (P [T, R] in z's dtype),
so the forward and the backward are chosen separately, each the first time its shape class
is seen (``path_choice``, which also picks between the fused and two-kernel Triton forwards):

    forward class  = ("forward", device, dtype, d, R, next_pow2(T), row_scale?, save?, ω applied?, residual?,
                      "vector bank" for a vector task bank)
    backward class = ("backward", device, dtype, d, R, next_pow2(T), row_scale?, needs..., "vector bank")

Neither wins everywhere: cuBLAS GEMMs are hard to beat at large T, while the Triton kernels
save the T x R intermediate's round trip and launches. Where nothing can be measured (no
autotuning, the interpreter, CUDA graph capture) a choice made earlier for the class holds,
else the Triton kernels run. ``path_choice.choices()`` lists what was picked.
"""

from __future__ import annotations

import torch

from . import path_choice, torch_backend, triton_backend
from .composition import GRAD_FIELDS, Composition, Gradients

_CANDIDATES = {"triton": triton_backend, "torch": torch_backend}


def _vector_bank(call: Composition) -> tuple[str, ...]:
    """A vector bank runs other kernels than a row_scale call (kernels/task_bank.py): its shape
    classes end in ``"vector bank"`` (other classes are unchanged)."""
    return ("vector bank",) if call.omega_bank is not None and call.omega_bank.shape[-1] != 1 else ()


def forward(call: Composition) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_backend.forward`` or ``torch_backend.forward``, whichever is faster here."""
    flags = (
        call.row_scale is not None or call.omega_bank is not None,  # a uniform bank is a row_scale
        call.save_for_backward,
        call.omega is None,
        call.residual is not None,
    )
    key = ("forward", *path_choice.shape_class(call.z, call.w_down.shape[0], *flags), *_vector_bank(call))
    name = path_choice.choice(key)  # the common case: chosen before
    if name is None:
        candidates = {n: (lambda m=m: m.forward(call)) for n, m in _CANDIDATES.items()}
        name = path_choice.fastest(key, candidates, measure=path_choice._can_measure(call.z))
    return _CANDIDATES[name].forward(call)


def backward(call: Composition, pre: torch.Tensor, grad_out: torch.Tensor, needs: Gradients) -> Gradients:
    """``triton_backend.backward`` or ``torch_backend.backward``, whichever is faster here."""
    per_row = call.row_scale is not None or call.omega_bank is not None
    # a (uniform) bank's gradient is a row_scale gradient (ops/bank.py): same class
    as_rows = needs._replace(row_scale=bool(needs.row_scale or needs.omega_bank))
    flags = (bool(v) for name, v in zip(GRAD_FIELDS, as_rows, strict=True) if name != "omega_bank")
    key = ("backward", *path_choice.shape_class(call.z, pre.shape[1], per_row, *flags), *_vector_bank(call))
    name = path_choice.choice(key)
    if name is None:
        candidates = {n: (lambda m=m: m.backward(call, pre, grad_out, needs)) for n, m in _CANDIDATES.items()}
        name = path_choice.fastest(key, candidates, measure=path_choice._can_measure(call.z))
    return _CANDIDATES[name].backward(call, pre, grad_out, needs)
