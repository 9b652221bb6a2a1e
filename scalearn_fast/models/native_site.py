"""The native output site (``scalearn_fast/site_extension``) for a patched BERT-like FFN output module,
and the guards that say when it no longer does what the Python path would.

``build_output_site`` runs after the Python path answered a call. It returns
``(site, entries, sizes)`` when that path was a prepared eval path: the sub-layer an
``AdapterFusionLayer`` on its inference fold (post-LN, τ = 1, without ``residual_before`` or
``query_before_ln``) or a ``ScaLearnLayer`` on its inference plan's torch runner (post-LN), in
eval mode with nothing to differentiate; the FFN projection a plain ``nn.Linear``; its dropout an
``nn.Dropout`` in eval mode; no hooks anywhere on the way. Else None. ``SiteForward`` calls
``site(h, x, entries, sizes)``, which re-checks everything the Python path chose its branch on:

* every tensor it reads (the FFN projection, the LayerNorm, each weight the prepared weights
  were made from): the same storage and version, and nothing to differentiate under grad mode;
* ``entries`` (dict, key, value): each module's mode and settings, parameter, buffer and
  submodule slots, the optimizer-step counter, by identity;
* ``sizes`` (dict, size): the hook dicts (module and global) still empty, and no slot added.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .. import layers_base, site_extension
from ..layers import ScaLearnLayer
from ..layers_base import layer_norm_parts
from ..layers_fusion import _FOLDING_BACKENDS, _PROJECTIONS, AdapterFusionLayer
from .hooks import GLOBAL_HOOKS, has_global_hooks, has_hooks, hook_dicts

NativeSite = tuple[Any, tuple, tuple]
_MISSING = object()  # the expected value of a dict key that must stay absent
_SETTINGS = {
    AdapterFusionLayer: (
        "training", "backend", "T", "pre_ln", "residual_before", "query_before_ln", "activation",
        "scaling", "layer_norm",
    ),
    ScaLearnLayer: ("training", "backend", "pre_ln", "activation", "layer_norm"),
}  # fmt: skip


class _Guards:
    """Collects the ``entries`` and ``sizes`` tuples the native site checks on every call."""

    def __init__(self) -> None:
        self.entries: list[Any] = [_MISSING]  # the first item names the "absent" marker
        self.sizes: list[Any] = []

    def entry(self, mapping: dict, key: str) -> None:
        self.entries += (mapping, key, mapping.get(key, _MISSING))

    def contents(self, mapping: dict) -> None:
        """Every slot of ``mapping`` keeps its object, and none is added."""
        for key in mapping:
            self.entry(mapping, key)
        self.sizes += (mapping, len(mapping))

    def empty(self, mappings: tuple[dict, ...]) -> None:
        for mapping in mappings:
            self.sizes += (mapping, 0)


def build_output_site(
    site: nn.Module, dense: nn.Module, dropout: nn.Module, sublayer: nn.Module, like: torch.Tensor
) -> NativeSite | None:
    """The native site for this output module, or None where the Python path is not a prepared
    eval path or the extension is not there. ``like``: a tensor of the call's dtype and device."""
    kind = type(sublayer)
    if kind not in _SETTINGS:
        return None
    attrs = sublayer.__dict__
    if (
        attrs["training"]
        or attrs["pre_ln"]
        or type(dense) is not nn.Linear
        or type(dropout) is not nn.Dropout
        or dropout.training
        or has_global_hooks()
        or any(has_hooks(m) for m in (dense, dropout, sublayer))
    ):
        return None
    extension = site_extension.extension()
    layer_norm, ln = layer_norm_parts(sublayer)
    if extension is None or ln is None:
        return None
    dense_params = dense._parameters
    made = (_fusion if kind is AdapterFusionLayer else _scalearn)(extension, sublayer, dense_params, ln, like)
    if made is None:
        return None
    make, weights = made
    watched = [dense_params["weight"], dense_params["bias"], ln[1], ln[2], *weights]
    watched = [t for t in watched if t is not None]
    if any(t.is_inference() for t in watched):
        return None
    entries, sizes = _guards(site, dense, dropout, sublayer, layer_norm)
    return make(watched), entries, sizes


def _site_args(dense_params: dict, ln: tuple) -> tuple:
    normalized_shape, ln_weight, ln_bias, eps = ln
    dense = dense_params["weight"], dense_params["bias"]
    return *dense, list(normalized_shape), ln_weight, ln_bias, float(eps)


def _fusion(extension: Any, layer: AdapterFusionLayer, dense_params: dict, ln: tuple, like: torch.Tensor):
    """``(make(watched), weights)`` for a fusion layer on its merged fold, else None."""
    attrs = layer.__dict__
    if (
        attrs["residual_before"]
        or attrs["query_before_ln"]
        or attrs["T"] != 1.0
        or attrs["backend"] not in _FOLDING_BACKENDS
    ):
        return None
    probe = like.new_empty(0, layer.hidden_size)
    plan = layer._eval_fold(probe, probe, None)
    if plan is None or not plan.fold.merged or plan.fold.residual_value is not None:
        return None
    fold = plan.fold
    if fold.weight.dtype != dense_params["weight"].dtype:
        return None

    def make(watched: list[torch.Tensor]) -> Any:
        return extension.fusion_output_site(
            *_site_args(dense_params, ln), fold.weight, fold.bias, fold.value,
            fold.num_sources, fold.block, fold.activation, watched,
        )  # fmt: skip

    return make, layer._weights()


def _scalearn(extension: Any, layer: ScaLearnLayer, dense_params: dict, ln: tuple, like: torch.Tensor):
    """``(make(watched), weights)`` for a ScaLearn layer on its plan's torch runner, else None."""
    probe = like.new_empty(0, layer.hidden_size)
    plan = layer._inference_plan(probe)
    folded = None if plan is None else plan.folded_weights()
    if folded is None or folded[0].dtype != dense_params["weight"].dtype:
        return None
    activation = layer.__dict__["activation"]

    def make(watched: list[torch.Tensor]) -> Any:
        return extension.scalearn_output_site(*_site_args(dense_params, ln), *folded, activation, watched)

    return make, list(layer._parameters.values())


def _guards(
    site: nn.Module, dense: nn.Module, dropout: nn.Module, sublayer: nn.Module, layer_norm: Any
) -> tuple[tuple, tuple]:
    guards = _Guards()
    guards.contents(site._modules)  # the same dense, dropout and sub-layer objects
    guards.contents(dense._parameters)
    guards.entry(dropout.__dict__, "training")
    for module in (dense, dropout, sublayer):
        guards.empty(hook_dicts(module))
    guards.empty(GLOBAL_HOOKS)
    for name in _SETTINGS[type(sublayer)]:
        guards.entry(sublayer.__dict__, name)
    for slots in (sublayer._parameters, sublayer._buffers, sublayer._modules):
        guards.contents(slots)
    for name in _PROJECTIONS:
        projection = sublayer._modules.get(name)
        if projection is not None:
            guards.contents(projection._parameters)
    ln_module = layer_norm
    if type(layer_norm) is not nn.LayerNorm:  # a holder (LayerNormRef): its module slot
        guards.entry(layer_norm.__dict__, "module")
        ln_module = layer_norm.__dict__["module"]
    guards.contents(ln_module._parameters)
    for name in ("normalized_shape", "eps"):
        guards.entry(ln_module.__dict__, name)
    guards.entry(layers_base.__dict__, "_optimizer_steps")
    return tuple(guards.entries), tuple(guards.sizes)
