"""The composition custom op written in ATen, for ``ExportedProgram.run_decompositions``.

``scalearn_fast::scaled_adapter_sum`` runs a backend chosen by name (Python, and Triton kernels on
CUDA); an AOTInductor package cannot call back into either. Its decomposition is the torch
backend's forward (``ops.torch_backend``): the same two-GEMM maths the CPU default runs, as plain
ATen operations that Inductor compiles for CPU, or for CUDA with cuBLAS GEMMs and its own fused
kernels.

The export forms of ``ScaLearnLayer`` and ``AdapterFusionLayer`` (``deploy.frozen``) never emit the
op; this table is for a model that calls the functional ops or holds a composition without an
export form (a router) under ``torch.export``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops import dispatch  # noqa: F401  (defines the custom ops)
from ..ops import torch_backend
from ..ops.composition import Composition


def _scaled_adapter_sum(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
    *fields, _backend = args  # the backend name: every backend computes the same sum
    return torch_backend.forward(Composition(*fields))  # type: ignore[arg-type]


def composition_decompositions() -> dict[torch._ops.OpOverload, Callable[..., object]]:
    """``{op: ATen decomposition}`` for the composition's forward op."""
    return {torch.ops.scalearn_fast.scaled_adapter_sum.default: _scaled_adapter_sum}


def custom_ops_in(program: torch.export.ExportedProgram) -> list[str]:
    """The ``scalearn_fast`` operators left in an exported program's graph, by name."""
    return sorted(
        {
            str(node.target)
            for node in program.graph_module.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("scalearn_fast.")
        }
    )
