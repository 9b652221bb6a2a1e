"""The oracle of a LoRA mixture at one Linear site: the readable per-expert loop in float64.

    out = scaling · Σ_n g_n(x) · B_n · (A_n · x)

``A_n`` is the shared down matrix ``a_down [r, d_in]`` (MoSLD) or block n of the per-expert
``a_down [N·r, d_in]`` (PEFT sources); ``B_n = b_up[n] [d_out, r]``. Every expert runs its own
two matmuls on its own [T, d_out] output, as a PEFT-style loop does. Slow on purpose and
differentiable by plain autograd; the fused op is tested against it.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def lora_mixture_reference(x: Tensor, a_down: Tensor, b_up: Tensor, gates: Tensor, scaling: float) -> Tensor:
    """``scaling · Σ_n gates[..., n] · B_n A_n x`` for ``x [..., d_in]``, computed in float64 one
    expert at a time; returned in x's dtype. Shapes as for ``lora_mixture`` (checked there)."""
    n, _, r = b_up.shape
    shared = a_down.shape[0] == r
    x64, a64, b64, g64 = x.double(), a_down.double(), b_up.double(), gates.double()
    out = x64.new_zeros(*x.shape[:-1], b_up.shape[1])
    for i in range(n):
        a_i = a64 if shared else a64[i * r : (i + 1) * r]
        out = out + g64[..., i : i + 1] * ((x64 @ a_i.T) @ b64[i].T)
    return (scaling * out).to(x.dtype)
