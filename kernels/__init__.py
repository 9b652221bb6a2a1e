"""Triton kernels + thin launchers; installed as ``scalearn_fast.kernels``.

``scaled_adapter_sum`` holds the forward kernels, ``scaled_adapter_sum_backward`` the backward
ones, ``task_bank`` those of a vector task bank (one ω row per token). What they all share:
``tiles`` the jit tile helpers (device side), ``common`` the autotune configs and launcher
utilities (host side).
Each of those launchers has a plain-PyTorch ``*_ref`` twin used by the tests. ``lora_mixture``
holds the expand half of a LoRA mixture, forward and backward (its torch twin is
``scalearn_fast/ops/lora_mixture_torch.py``).

The names below load on first use (PEP 562), so importing this package needs no Triton.
That matters beyond tidiness: run from a source tree, this folder is the top-level module
``kernels``, the name of Hugging Face's kernel-hub library, and transformers 5.x imports
whatever ``kernels`` it finds while it checks for that library. Importing must not fail
there, and with no ``__version__`` here transformers reads it as "hub kernels unavailable".
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCE_MODULE = {
    "FUSED_MAX_R": "scaled_adapter_sum",
    "FUSED_MAX_R_FP32": "scaled_adapter_sum",
    "autotune_enabled": "common",
    "down_projection": "scaled_adapter_sum",
    "down_projection_ref": "scaled_adapter_sum",
    "fused_fits": "scaled_adapter_sum",
    "fused_forward": "scaled_adapter_sum",
    "fused_forward_ref": "scaled_adapter_sum",
    "up_projection": "scaled_adapter_sum",
    "up_projection_ref": "scaled_adapter_sum",
    "lora_mixture_expand": "lora_mixture",
    "lora_mixture_expand_backward": "lora_mixture",
    "grad_pre": "scaled_adapter_sum_backward",
    "grad_pre_ref": "scaled_adapter_sum_backward",
    "tn_gemm": "scaled_adapter_sum_backward",
    "tn_gemm_ref": "scaled_adapter_sum_backward",
    "bank_up_projection": "task_bank",
    "bank_up_projection_ref": "task_bank",
    "bank_grad_pre": "task_bank",
    "bank_grad_pre_ref": "task_bank",
    "bank_omega_grad": "task_bank",
    "bank_omega_grad_ref": "task_bank",
    "task_segments": "task_bank",
}

_SUBMODULES = frozenset(_SOURCE_MODULE.values())

__all__ = sorted(_SOURCE_MODULE)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # also binds it here
    module = _SOURCE_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
