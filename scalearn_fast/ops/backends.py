"""Which backends exist on this machine, and how ``backend="auto"`` picks one.

A backend module exposes ``forward`` and ``backward`` with the signatures of
``torch_backend``; the custom op dispatches to it by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA when Triton is installed, else ``torch``."""
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}; got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise ValueError(
                "backend='triton' needs the triton package (pip install 'scalearn-fast[triton]')"
            )
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
                f"got tensors on {device}"
            )
    return backend


def backend_module(name: str) -> ModuleType:
    """The module implementing ``forward``/``backward`` for a resolved backend name."""
    if name == "torch":
        return importlib.import_module("scalearn_fast.ops.torch_backend")
    if name == "triton":
        return importlib.import_module("scalearn_fast.ops.triton_backend")
    raise ValueError(f"backend {name!r} has no fused implementation")
