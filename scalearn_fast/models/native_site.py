"""The native AdapterFusion output site (``scalearn_fast/native``) for a patched BERT-like FFN
output module, and the guards that say when it no longer does what the Python path would.

``build_fusion_output_site`` runs after the Python path answered a call. It returns
``(site, entries, sizes)`` when that path was the eval fold (the sub-layer an
``AdapterFusionLayer`` in eval mode, post-LN, τ = 1, without ``residual_before`` or
``query_before_ln``; the FFN projection a plain ``nn.Linear``, its dropout an ``nn.Dropout`` in
eval mode; no hooks anywhere on the way), else None. ``SiteForward`` calls
``site(h, x, entries, sizes)``, which re-checks everything the Python path chose its branch on:

* every tensor it reads (the FFN projection, the LayerNorm, each source and fusion weight): the
  same storage and version, and nothing to differentiate when grad mode is on;
* ``entries`` (dict, key, value): each module's mode and settings, parameter and submodule
  slots, the optimizer-step counter, by identity;
* ``sizes`` (dict, size): the hook dicts (module and global) still empty, and no slot added.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from .. import layers_base, native
from ..layers_base import layer_norm_parts
from ..layers_fusion import _FOLDING_BACKENDS, _PROJECTIONS, AdapterFusionLayer
from .hooks import GLOBAL_HOOKS, has_global_hooks, has_hooks, hook_dicts

NativeSite = tuple[Any, tuple, tuple]
_MISSING = object()  # the expected value of a dict key that must stay absent
_FUSION_SETTINGS = (
    "training", "backend", "T", "pre_ln", "residual_before", "query_before_ln", "activation",
    "scaling", "layer_norm",
)  # fmt: skip


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

    def empty(self, hooks: tuple[dict, ...]) -> None:
        for mapping in hooks:
            self.sizes += (mapping, 0)


def build_fusion_output_site(
    site: nn.Module, dense: nn.Module, dropout: nn.Module, sublayer: nn.Module, like: torch.Tensor
) -> NativeSite | None:
    """The native site for this output module, or None where the Python path is not the eval
    fold or the extension is not there. ``like``: a tensor of the call's dtype and device."""
    if type(sublayer) is not AdapterFusionLayer:
        return None
    extension = native.extension()
    if extension is None:
        return None
    attrs = sublayer.__dict__
    if (
        attrs["training"]
        or attrs["pre_ln"]
        or attrs["residual_before"]
        or attrs["query_before_ln"]
        or attrs["T"] != 1.0
        or attrs["backend"] not in _FOLDING_BACKENDS
        or type(dense) is not nn.Linear
        or type(dropout) is not nn.Dropout
        or dropout.training
        or has_global_hooks()
        or any(has_hooks(m) for m in (dense, dropout, sublayer))
    ):
        return None
    layer_norm, ln = layer_norm_parts(sublayer)
    if ln is None:
        return None
    probe = like.new_empty(0, sublayer.hidden_size)
    plan = sublayer._eval_fold(probe, probe, None)
    if plan is None or not plan.fold.merged or plan.fold.residual_value is not None:
        return None
    normalized_shape, ln_weight, ln_bias, eps = ln
    dense_params = dense._parameters
    watched = [dense_params["weight"], dense_params["bias"], ln_weight, ln_bias, *sublayer._weights()]
    watched = [t for t in watched if t is not None]
    if any(t.is_inference() for t in watched):
        return None
    entries, sizes = _guards(site, dense, dropout, sublayer, layer_norm)
    return _site(extension, plan.fold, dense_params, ln, watched), entries, sizes


def _site(extension: ModuleType, fold: Any, dense_params: dict, ln: tuple, watched: list) -> Any:
    normalized_shape, ln_weight, ln_bias, eps = ln
    return extension.FusionOutputSite(
        dense_params["weight"], dense_params["bias"], list(normalized_shape), ln_weight, ln_bias, float(eps),
        fold.weight, fold.bias, fold.value, fold.num_sources, fold.block, fold.activation, watched,
    )  # fmt: skip


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
    for name in _FUSION_SETTINGS:
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
