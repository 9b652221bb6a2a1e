"""``export``: a model with compositions attached, as an AOTInductor package (``.pt2``) that a
process without Python runs (``scalearn-run``, or ``torch::inductor::AOTIModelPackageLoader``).

Route: the model's composition sub-layers are swapped for their export forms (ω folded into U,
AdapterFusion's weights folded; ``deploy.frozen``), the model is traced by ``torch.export`` with a
dynamic batch and sequence length, and ``torch._inductor.aoti_compile_and_package`` compiles the
program for the model's device. Under ``torch.export`` the composition custom op is never
emitted: ``ops.dispatch`` computes it with the torch backend's ATen operations (the maths the CPU
default runs), so a router, or a model calling the functional ops, exports too. Every refusal
happens here, before anything is compiled.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..layers import ScaLearnLayer, is_shared
from ..layers_bank import TaskBankLayer
from .frozen import frozen_compositions

ExampleInputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]

METADATA_PREFIX = "scalearn_fast."
"""Package metadata keys: ``inputs`` and ``outputs`` (comma-separated names, in call order),
``compositions`` and ``version``."""

_KIND_NAMES = {"AdapterFusionLayer": "adapter_fusion", "RouterLayer": "router"}  # and ScaLearn's variants
_NO_EXPORT_PATH = {
    TaskBankLayer: "a task bank reads each sequence's task from Python state set per call",
}


class _Program(nn.Module):
    """The model called with named inputs, returning its output tensors as a flat tuple."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for _, t in output_tensors(self.model(**dict(zip(self.names, inputs, strict=True)))))


def output_tensors(out: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each tensor a model returned: a tensor (``output``), a Hugging Face
    ``ModelOutput`` (its field names) or a tuple (``output_<i>``); other values are left out."""
    if isinstance(out, torch.Tensor):
        return [("output", out)]
    if isinstance(out, Mapping):
        return [(str(k), v) for k, v in out.items() if isinstance(v, torch.Tensor)]
    if isinstance(out, tuple | list):
        return [(f"output_{i}", v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
    return []


def custom_ops_in(program: torch.export.ExportedProgram) -> list[str]:
    """The ``scalearn_fast`` operators in an exported program's graph, by name (none expected)."""
    targets = {str(n.target) for n in program.graph_module.graph.nodes if n.op == "call_function"}
    return sorted(t for t in targets if t.startswith("scalearn_fast."))


def check_exportable(model: nn.Module) -> list[str]:
    """Refuse what a package cannot hold, with the reason; returns the composition kinds found."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"export needs the model in eval mode (call model.eval()); in training mode: "
            f"{', '.join(training[:3])}{', ...' if len(training) > 3 else ''}"
        )
    kinds: list[str] = []
    for name, module in model.named_modules():
        for kind, why in _NO_EXPORT_PATH.items():
            if isinstance(module, kind):
                raise ValueError(f"{name} is a {kind.__name__}, which has no export path: {why}")
        if isinstance(module, ScaLearnLayer):
            kinds.append(module.variant)
        elif type(module).__name__ in _KIND_NAMES:
            kinds.append(_KIND_NAMES[type(module).__name__])
    _check_shared_omega(model)
    return sorted(set(kinds))


def _check_shared_omega(model: nn.Module) -> None:
    """A ``++`` variant folds its one ω into every layer's U: the layers must still share it."""
    from ..models.scalearn import is_attached, shared_omega

    layers = [m for m in model.modules() if isinstance(m, ScaLearnLayer)]
    if layers and is_shared(layers[0].variant) and is_attached(model):
        shared_omega(model)


def named_inputs(model: nn.Module, example_inputs: ExampleInputs) -> tuple[list[str], list[torch.Tensor]]:
    """The package's inputs by name: a tensor is ``input_ids``; a sequence names its tensors by
    ``model.forward``'s parameters in order; a mapping by its keys."""
    if isinstance(example_inputs, torch.Tensor):
        pairs = [("input_ids", example_inputs)]
    elif isinstance(example_inputs, Mapping):
        pairs = [(str(k), v) for k, v in example_inputs.items()]
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        params = list(inspect.signature(model.forward).parameters)
        if len(example_inputs) > len(params):
            raise ValueError(
                f"example_inputs holds {len(example_inputs)} tensors; model.forward takes {len(params)}"
            )
        pairs = list(zip(params, example_inputs, strict=False))
    else:
        raise ValueError(
            "example_inputs must be a tensor, a sequence or a mapping of tensors; "
            f"got {type(example_inputs).__name__}"
        )
    if not pairs:
        raise ValueError("example_inputs is empty: give at least the input ids")
    for name, t in pairs:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"example_inputs[{name!r}] must be a tensor; got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"example_inputs[{name!r}] has shape {list(t.shape)}: expected [batch, seq, ...]"
            )
    lead = {tuple(t.shape[:2]) for _, t in pairs}
    if len(lead) != 1:
        shapes = {name: list(t.shape) for name, t in pairs}
        raise ValueError(f"example_inputs must share their [batch, seq] dims; got {shapes}")
    return [name for name, _ in pairs], [t for _, t in pairs]


def _dynamic_shapes(model: nn.Module, tensors: list[torch.Tensor], batch: bool, seq: bool) -> tuple | None:
    if not (batch or seq):
        return None
    dims: dict[int, Any] = {}
    if batch:
        dims[0] = torch.export.Dim("batch", min=1, max=1 << 20)
    if seq:
        max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        dims[1] = torch.export.Dim("seq", min=1, max=int(max_len) if max_len else 1 << 20)
    return (tuple(dict(dims) for _ in tensors),)  # one entry: _Program.forward's *inputs


def _like(model: nn.Module) -> torch.Tensor:
    """A floating-point tensor in the model's dtype and device, for the folds."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.new_zeros(0)
    return torch.zeros(0)


def export_program(
    model: nn.Module, example_inputs: ExampleInputs, *, dynamic_batch: bool = True, dynamic_seq: bool = True
) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """The ``torch.export`` program of ``model`` with folded compositions and no custom op, and
    the package metadata (``METADATA_PREFIX`` keys)."""
    kinds = check_exportable(model)
    names, tensors = named_inputs(model, example_inputs)
    for dim, (name, dynamic) in enumerate((("dynamic_batch", dynamic_batch), ("dynamic_seq", dynamic_seq))):
        if dynamic and tensors[0].shape[dim] < 2:  # torch.export specializes a size of 1
            raise ValueError(
                f"{name}=True needs example_inputs of size >= 2 in dim {dim}; got {list(tensors[0].shape)}"
            )
    with torch.no_grad():
        outputs = output_tensors(model(**dict(zip(names, tensors, strict=True))))
    if not outputs:
        raise ValueError(f"{type(model).__name__} returned no tensor for example_inputs: nothing to export")
    with frozen_compositions(model, _like(model)):
        program = torch.export.export(
            _Program(model, names),
            tuple(tensors),
            dynamic_shapes=_dynamic_shapes(model, tensors, dynamic_batch, dynamic_seq),
        )
    left = custom_ops_in(program)
    if left:
        raise ValueError(f"the exported program still calls {left}, which a package cannot run")
    from .. import __version__

    metadata = {
        "inputs": ",".join(names),
        "outputs": ",".join(name for name, _ in outputs),
        "compositions": ",".join(kinds),
        "version": __version__,
    }
    return program, {METADATA_PREFIX + k: v for k, v in metadata.items()}


def export(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    dynamic_seq: bool = True,
) -> Path:
    """Write ``model`` (in eval mode, compositions attached) as an AOTInductor package.

    Args:
        model: e.g. a Hugging Face model after ``attach_scalearn`` or ``attach_fusion``.
        example_inputs: the input ids ``[batch, seq]``, or a mapping of the model's keyword
            inputs (``{"input_ids": ..., "attention_mask": ...}``), or a sequence of its
            positional inputs; every one [batch, seq, ...]. They become the package's inputs, in
            this order (their names are in the package metadata).
        path: the ``.pt2`` file to write (its folder is created).
        dynamic_batch, dynamic_seq: whether the package takes any batch size / any sequence
            length up to the model's ``max_position_embeddings`` (else the example's).

    The package computes on the model's device and dtype, and returns the model's output tensors
    (a ``ModelOutput``'s fields in order). ω is folded into the up projections and
    AdapterFusion's weights are folded before tracing, so the package holds folded weights.

    Raises:
        ValueError: the model is in training mode, holds a composition with no export path (a
            task bank), a ``++`` variant whose layers no longer share one ω, or the inputs or
            ``path`` are not usable.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"path must name a .pt2 file; got {str(path)!r}")
    program, metadata = export_program(
        model, example_inputs, dynamic_batch=dynamic_batch, dynamic_seq=dynamic_seq
    )
    from torch._inductor import aoti_compile_and_package

    path.parent.mkdir(parents=True, exist_ok=True)
    aoti_compile_and_package(
        program, package_path=str(path), inductor_configs={"aot_inductor.metadata": metadata}
    )
    return path
