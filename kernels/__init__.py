"""Triton kernels + thin launchers (DESIGN.md §3); installed as ``scalearn_fast.kernels``.

Each launcher has a plain-PyTorch ``*_ref`` twin used by the tests.
"""

from .scaled_adapter_sum import (
    FUSED_MAX_R,
    FUSED_MAX_R_FP32,
    down_projection,
    down_projection_ref,
    fused_fits,
    fused_forward,
    fused_forward_ref,
    up_projection,
    up_projection_ref,
)
from .scaled_adapter_sum_backward import grad_pre, grad_pre_ref, tn_gemm, tn_gemm_ref

__all__ = [
    "FUSED_MAX_R",
    "FUSED_MAX_R_FP32",
    "down_projection",
    "down_projection_ref",
    "fused_fits",
    "fused_forward",
    "fused_forward_ref",
    "grad_pre",
    "grad_pre_ref",
    "up_projection",
    "tn_gemm",
    "tn_gemm_ref",
    "up_projection_ref",
]
