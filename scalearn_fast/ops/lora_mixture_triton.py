"""The Triton backend of a LoRA mixture's "expand": the kernels of ``kernels/lora_mixture.py``
where they apply, the torch implementation where they do not.

The kernels take fp16 and fp32 (bf16 too, on a GPU). They are not used for

- float64 (the kernels accumulate in fp32 and are not built for it) and, under
  ``TRITON_INTERPRET=1``, bfloat16 (the interpreter's ``tl.dot`` is wrong for both);
- the backward at ranks with ``next_pow2(r) > MAX_RANK`` (one expert's columns are one tile).

Those calls run ``ops/lora_mixture_torch.py``: same maths, same signatures.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from .._kernels import load_kernels
from .lora_mixture_torch import lora_mixture_expand as torch_expand
from .lora_mixture_torch import lora_mixture_expand_backward as torch_expand_backward
from .triton_backend import runs_on_torch

Tensor = torch.Tensor


@functools.cache
def _kernels() -> ModuleType:
    return importlib.import_module(f"{load_kernels().__name__}.lora_mixture")


def lora_mixture_expand(p: Tensor, gates: Tensor, b_up: Tensor, scaling: float, *, shared: bool) -> Tensor:
    """``scaling · S · B_catᵀ`` (``ops/lora_mixture_torch.py``), in one Triton launch."""
    if runs_on_torch(p.dtype):
        return torch_expand(p, gates, b_up, scaling, shared=shared)
    return _kernels().lora_mixture_expand(p, gates, b_up, scaling, shared=shared)


def lora_mixture_expand_backward(
    p: Tensor, gates: Tensor, b_up: Tensor, grad_out: Tensor, scaling: float, *, shared: bool,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """``(dp, dgates, db_up)`` (``ops/lora_mixture_torch.py``), in two Triton launches."""
    kernels = _kernels()
    if runs_on_torch(p.dtype) or not kernels.backward_fits(b_up.shape[2]):
        return torch_expand_backward(p, gates, b_up, grad_out, scaling, shared=shared, needs=needs)
    return kernels.lora_mixture_expand_backward(p, gates, b_up, grad_out, scaling, shared=shared, needs=needs)
