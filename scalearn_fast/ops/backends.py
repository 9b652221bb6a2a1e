"""Which backends exist on this machine, and how ``backend="auto"`` picks one.

A backend module implements ``composition.Backend`` (``forward``/``backward`` over a
``Composition``); ``ops/dispatch.py`` reaches it by name (``reference``, ``torch``, ``triton``,
or ``auto``: the measured choice between the last two on CUDA).
"""

from __future__ import annotations

import functools
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
    """``auto`` stays ``auto`` on CUDA when Triton is installed (per shape class, the faster of
    the Triton kernels and the torch backend's cuBLAS GEMMs: ``auto_backend``), else ``torch``."""
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "auto"
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


@functools.cache
def backend_module(name: str) -> ModuleType:
    """The module implementing ``forward``/``backward`` over a ``Composition`` for a resolved
    backend name (imported on first use: the triton backend imports triton)."""
    modules = {
        "reference": "reference",
        "torch": "torch_backend",
        "triton": "triton_backend",
        "auto": "auto_backend",
    }
    if name not in modules:
        raise ValueError(f"backend {name!r} has no implementation; expected one of {tuple(modules)}")
    return importlib.import_module(f"{__package__}.{modules[name]}")
