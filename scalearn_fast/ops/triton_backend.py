"""The Triton backend of ``scalearn_fast::scaled_adapter_sum`` (the CUDA default).

Same signatures and semantics as ``torch_backend`` (read its docstring for the math).
The T-sized GEMMs run in the kernels of ``kernels/`` (``scalearn_fast.kernels``); the
O(N·d), O(R·d) and O(T·N) pieces (the folded bias, the per-source ω reduction, dB,
db_D, the per-source row_scale reduction) are plain torch here.

Forward: one fused kernel (S kept on chip) when next_pow2(R) <= ``kernels.FUSED_MAX_R``,
else ``down_projection`` then ``up_projection``. ``USE_FUSED`` switches the fused kernel
off altogether (tests flip it to exercise both paths).
"""

from __future__ import annotations

import torch

from scalearn_fast._kernels import load_kernels

from . import torch_backend

USE_FUSED = True


def _bias(b_up, omega, row_scale):
    """Σ_i ω_i ⊙ b_up_i [d] (fp32), w·(ω⊙B) [T, d] with row_scale, or the folded b_up."""
    if omega is None:
        return b_up.reshape(-1).contiguous()
    scaled = omega.float() * b_up.float()  # [N, d]
    if row_scale is not None:
        return (row_scale.float() @ scaled).contiguous()
    return scaled.sum(0)


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
    """``z [T, d]`` -> ``(out [T, d], pre-activation [T, R] or empty)``; see ``torch_backend.forward``."""
    k = load_kernels()
    dtype = z.dtype
    w_down, w_up = w_down.to(dtype), w_up.to(dtype)
    bias = _bias(b_up, omega, row_scale)
    if USE_FUSED and k.fused_fits(w_down.shape[0]):
        return k.fused_forward(
            z, w_down, b_down, w_up, omega, source_index, bias, residual, row_scale, activation, save_pre
        )
    pre, hidden = k.down_projection(z, w_down, b_down, source_index, row_scale, activation, save_pre)
    out = k.up_projection(hidden, w_up, omega, source_index, bias, residual)
    return out, pre


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
    """Gradients ``[dz, dw_down, db_down, dw_up, db_up, domega, drow_scale]`` (see torch_backend).

    TEMPORARY: delegates to the torch backend until the backward kernels land.
    """
    return torch_backend.backward(
        grad_out, z, pre, w_down, w_up, b_up, omega, source_index, row_scale, activation, needs
    )
