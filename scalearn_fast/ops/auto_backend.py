"""``backend="auto"`` on CUDA: per shape class, the faster of the Triton kernels and the
collapsed two GEMMs on cuBLAS (the torch backend), measured on the device.

Both backends compute the same function with the same saved state (P [T, R] in z's dtype),
so the forward and the backward are chosen separately, each the first time its shape class
is seen (``path_choice``, which also picks between the fused and two-kernel Triton forwards):

    forward class  = ("forward", device, dtype, d, R, next_pow2(T), row_scale?, save_pre?, folded?, residual?)
    backward class = ("backward", device, dtype, d, R, next_pow2(T), row_scale?, needs...)

Neither wins everywhere: cuBLAS GEMMs are hard to beat at large T, while the Triton kernels
save the T x R intermediate's round trip and launches. Where nothing can be measured (no
autotuning, the interpreter, CUDA graph capture) a choice made earlier for the class holds,
else the Triton kernels run.
``path_choice.choices()`` lists what was picked.
"""

from __future__ import annotations

import torch

from . import path_choice, torch_backend, triton_backend

_CANDIDATES = {"triton": triton_backend, "torch": torch_backend}


def forward(
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
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_backend.forward`` or ``torch_backend.forward``, whichever is faster here."""
    args = (z, w_down, b_down, w_up, b_up, omega, source_index, residual, row_scale, activation, save_pre)
    flags = (row_scale is not None, save_pre, omega is None, residual is not None)
    key = ("forward", *path_choice.shape_class(z, w_down.shape[0], *flags))
    name = path_choice.choice(key)  # the common case: chosen before
    if name is None:
        candidates = {n: (lambda m=m: m.forward(*args)) for n, m in _CANDIDATES.items()}
        name = path_choice.fastest(key, candidates, measure=path_choice._can_measure(z))
    return _CANDIDATES[name].forward(*args)


def backward(
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
    needs: list[bool],
) -> list[torch.Tensor]:
    """``triton_backend.backward`` or ``torch_backend.backward``, whichever is faster here."""
    args = (grad_out, z, pre, w_down, w_up, b_up, omega, source_index, row_scale, activation, needs)
    key = ("backward", *path_choice.shape_class(z, pre.shape[1], row_scale is not None, *needs))
    name = path_choice.choice(key)
    if name is None:
        candidates = {n: (lambda m=m: m.backward(*args)) for n, m in _CANDIDATES.items()}
        name = path_choice.fastest(key, candidates, measure=path_choice._can_measure(z))
    return _CANDIDATES[name].backward(*args)
