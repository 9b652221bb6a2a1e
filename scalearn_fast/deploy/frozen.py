"""Export forms of the composition sub-layers: the eval-mode forward of ``ScaLearnLayer`` and
``AdapterFusionLayer`` on weights folded once, held as buffers, in plain ATen.

An export form reuses its layer's own ``forward`` (the sub-layer wiring: post-LN or pre-LN, the
fusion's residual and query options) and its own inference maths (``ops.dispatch.infer`` on the
torch backend; ``ops.fusion_infer.adapter_fusion_folded``) on the folds the layer builds for its
eval path (``ScaLearnLayer._build_plan``: ω folded into U; ``fold_fusion``). Only the folded
tensors are registered, as buffers, so ``torch.export`` carries them as the package's constants
and nothing of the unfolded weights (ω, W_up, the fusion projections).

``frozen_compositions(model, like)`` swaps every such sub-layer of a model for its export form
and puts the originals back on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..layers import ScaLearnLayer, _InferencePlan, _plan
from ..layers_fusion import AdapterFusionLayer
from ..ops.fusion_infer import FusionFold, adapter_fusion_folded, fold_fusion

# Composition's fields from w_down through row_scale (None: not given on the inference path)
_SCALEARN_FIELDS = (
    "w_down", "b_down", "w_up", "b_up", "source_index", None, "scaled_up", "scaled_bias", None,
)  # fmt: skip
_FOLD_TENSORS = ("weight", "bias", "score_weight", "score_bias", "value", "residual_value")


class ExportScaLearn(nn.Module):
    """``ScaLearnLayer``'s eval forward with ω folded into U = W ⊙ ω[s]ᵀ and Σ_i ω_i ⊙ B_i."""

    forward = ScaLearnLayer.forward
    forward_pre_ln = ScaLearnLayer.forward_pre_ln
    forward_summed = ScaLearnLayer.forward_summed

    def __init__(self, layer: ScaLearnLayer, like: torch.Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            plan = layer._build_plan(like)
        for name, value in zip(_SCALEARN_FIELDS, plan.sources_and_coefficients, strict=True):
            if name is not None:
                self.register_buffer(name, value.detach().clone().contiguous())
        self.activation = layer.activation
        self.pre_ln = layer.pre_ln
        self.layer_norm = layer.layer_norm  # a reference to the model's own LayerNorm (not registered)

    def _inference_plan(self, z: torch.Tensor, *others: torch.Tensor | None) -> _InferencePlan:
        """A plan over the buffers, made per call (traced by ``torch.export``: the buffers are
        the package's constants), always on the torch backend (ATen only)."""
        b = self._buffers
        fields = tuple(b[name] if name is not None else None for name in _SCALEARN_FIELDS)
        return _plan(fields, self.activation, "torch")


class ExportFusion(nn.Module):
    """``AdapterFusionLayer``'s eval forward on its inference fold (τ as it stands at export)."""

    forward = AdapterFusionLayer.forward
    forward_pre_ln = AdapterFusionLayer.forward_pre_ln
    forward_summed = AdapterFusionLayer.forward_summed

    def __init__(self, layer: AdapterFusionLayer, like: torch.Tensor, *, merged: bool) -> None:
        super().__init__()
        with torch.no_grad():  # the fold of the layer's eval path, whatever its backend
            fusion = layer.fusion_weights(like)
            packed = layer.packed().to(like.dtype)
            fold = fold_fusion(packed, fusion, merged=merged, dtype=like.dtype, activation=layer.activation)
        self.settings = _fold_settings(fold)
        for name in _FOLD_TENSORS:
            value = getattr(fold, name)
            self.register_buffer(name, None if value is None else value.detach().clone())
        self.temperature = float(layer.T)
        self.pre_ln = layer.pre_ln
        self.layer_norm = layer.layer_norm
        self.residual_before = layer.residual_before
        self.query_before_ln = layer.query_before_ln

    def compose(
        self, z: torch.Tensor, residual: torch.Tensor | None = None, query_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._compose(z, residual, query_input)

    def _eval_fold(self, *_: torch.Tensor | None) -> None:
        """No cached plan: every call runs ``_compose`` on the buffers (traced by the export)."""
        return None

    def _compose_on(
        self,
        plan: None,
        z: torch.Tensor,
        residual: torch.Tensor | None,
        query_input: torch.Tensor | None,
        residual_checked: bool,
    ) -> torch.Tensor:
        """The layer's ``_compose_on`` (``forward_summed`` calls it): ``_compose``, no plan."""
        return self._compose(z, residual, query_input)

    def _compose(
        self, z: torch.Tensor, residual: torch.Tensor | None, query_input: torch.Tensor | None, **_: bool
    ) -> torch.Tensor:  # ``**_``: the layer's ``residual_checked`` (an export form checks nothing)
        b = self._buffers
        fold = FusionFold(*(b[name] for name in _FOLD_TENSORS), *self.settings)
        return adapter_fusion_folded(z, fold, residual, query_input, self.temperature)


def _fold_settings(fold: FusionFold) -> tuple:
    """The fold's non-tensor fields, in ``FusionFold``'s order after its tensors."""
    return (
        fold.hidden_size, fold.num_sources, fold.block, fold.merged, fold.residual_before, fold.activation,
    )  # fmt: skip


def export_form(layer: nn.Module, like: torch.Tensor) -> nn.Module | None:
    """The export form of a composition sub-layer, or ``None`` when ``layer`` is not one."""
    if isinstance(layer, ScaLearnLayer | AdapterFusionLayer):
        like = like.new_zeros(1, layer.hidden_size)  # a row of z, for the layer's own checks
    if isinstance(layer, ScaLearnLayer):
        return ExportScaLearn(layer, like)
    if isinstance(layer, AdapterFusionLayer):
        return ExportFusion(layer, like, merged=not layer.query_before_ln)
    return None


@contextmanager
def frozen_compositions(model: nn.Module, like: torch.Tensor) -> Iterator[int]:
    """Within the block every ``ScaLearnLayer`` / ``AdapterFusionLayer`` of ``model`` is replaced
    by its export form, folded in ``like``'s dtype and on its device; yields how many were."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                form = None if child is None else export_form(child, like)
                if form is not None:
                    swapped.append((parent, name, child))
                    parent._modules[name] = form
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child
