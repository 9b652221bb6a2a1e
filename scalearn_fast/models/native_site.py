"""Native sites (``scalearn_fast/site_extension``) for patched modules, and the guards that say
when one no longer does what the Python path would.

Two kinds, both built after the Python path answered a call and only where that path was a
prepared eval path: the sub-layer an ``AdapterFusionLayer`` on its inference fold (τ = 1, without
``residual_before`` or ``query_before_ln``) or a ``ScaLearnLayer`` on its inference plan's torch
runner, in eval mode with nothing to differentiate, and no hooks on the way.

* ``build_output_site``: a BERT-like FFN output module (post-LN) whose FFN projection is a plain
  ``nn.Linear`` and whose dropout an ``nn.Dropout`` in eval mode; called as ``site(h, x, ...)``.
* ``build_summed_site``: a site that sees ``s = h + x`` only (``_call_summed``: BART's and
  Marian's final LayerNorm, post-LN; mBART's and M2M100's layer, pre-LN); ``site(s, ...)``.

Each returns ``(call, entries, sizes)`` or None; the caller runs ``call(*inputs, entries, sizes)``,
which re-checks in C++ everything the Python path chose its branch on:

* every tensor it reads (the FFN projection, the LayerNorm, each weight the prepared weights
  were made from): the same storage and version, and nothing to differentiate under grad mode;
* ``entries`` (dict, key, value): each module's mode and settings, parameter, buffer and
  submodule slots, the optimizer-step counter, by identity;
* ``sizes`` (dict, size): the hook dicts (module and global) still empty, and no slot added.
"""

from __future__ import annotations

from collections.abc import Callable
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

    def sublayer(self, sublayer: nn.Module, layer_norm: Any) -> None:
        """The sub-layer's settings, slots and hooks, its LayerNorm (if any), the step counter."""
        self.empty(hook_dicts(sublayer))
        self.empty(GLOBAL_HOOKS)
        for name in _SETTINGS[type(sublayer)]:
            self.entry(sublayer.__dict__, name)
        for slots in (sublayer._parameters, sublayer._buffers, sublayer._modules):
            self.contents(slots)
        for name in _PROJECTIONS:
            projection = sublayer._modules.get(name)
            if projection is not None:
                self.contents(projection._parameters)
        if layer_norm is not None:
            module = layer_norm
            if type(layer_norm) is not nn.LayerNorm:  # a holder (LayerNormRef): its module slot
                self.entry(layer_norm.__dict__, "module")
                module = layer_norm.__dict__["module"]
            self.contents(module._parameters)
            for name in ("normalized_shape", "eps"):
                self.entry(module.__dict__, name)
        self.entry(layers_base.__dict__, "_optimizer_steps")

    def done(self) -> tuple[tuple, tuple]:
        return tuple(self.entries), tuple(self.sizes)


def _eligible(sublayer: nn.Module) -> bool:
    """A sub-layer kind with a native form, in eval mode, unobserved."""
    return (
        type(sublayer) in _SETTINGS
        and not sublayer.__dict__["training"]
        and not has_global_hooks()
        and not has_hooks(sublayer)
    )


def build_output_site(
    site: nn.Module, dense: nn.Module, dropout: nn.Module, sublayer: nn.Module, like: torch.Tensor
) -> NativeSite | None:
    """The native site of a BERT-like output module, or None where the Python path is not a
    prepared eval path or the extension is not there. ``like``: a tensor of the call's dtype
    and device."""
    if (
        not _eligible(sublayer)
        or sublayer.__dict__["pre_ln"]
        or type(dense) is not nn.Linear
        or type(dropout) is not nn.Dropout
        or dropout.training
        or has_hooks(dense)
        or has_hooks(dropout)
    ):
        return None
    extension = site_extension.extension()
    layer_norm, ln = layer_norm_parts(sublayer)
    if extension is None or ln is None:
        return None
    dense_weight, dense_bias = dense._parameters["weight"], dense._parameters["bias"]
    prepared = _prepared(extension, sublayer, like)
    if prepared is None or prepared[1] != dense_weight.dtype:
        return None
    make, _, weights = prepared
    made = _make(
        make, extension.Dense(dense_weight, dense_bias), extension, ln, [dense_weight, dense_bias, *weights]
    )
    if made is None:
        return None
    guards = _Guards()
    guards.contents(site._modules)  # the same dense, dropout and sub-layer objects
    guards.contents(dense._parameters)
    guards.entry(dropout.__dict__, "training")
    guards.empty(hook_dicts(dense))
    guards.empty(hook_dicts(dropout))
    guards.sublayer(sublayer, layer_norm)
    return made.output, *guards.done()


def build_summed_site(module: nn.Module, sublayer: nn.Module, like: torch.Tensor) -> NativeSite | None:
    """The native site of a module whose sub-layer takes ``s = h + x`` (``forward_summed``),
    or None as for ``build_output_site``."""
    attrs = sublayer.__dict__
    if not _eligible(sublayer) or (type(sublayer) is AdapterFusionLayer and attrs["query_before_ln"]):
        return None
    extension = site_extension.extension()
    if extension is None:
        return None
    layer_norm, ln = (None, None) if attrs["pre_ln"] else layer_norm_parts(sublayer)
    if not attrs["pre_ln"] and ln is None:
        return None
    prepared = _prepared(extension, sublayer, like)
    if prepared is None:
        return None
    make, _, weights = prepared
    made = _make(make, None, extension, ln, weights)
    if made is None:
        return None
    guards = _Guards()
    guards.contents(module._modules)  # the same sub-layer
    guards.sublayer(sublayer, layer_norm)
    return made.summed, *guards.done()


def _make(make: Callable, dense: Any, extension: Any, ln: tuple | None, tensors: list) -> Any:
    """``make(dense, layer_norm, watched)``, or None when a tensor to watch has no version."""
    layer_norm = None
    if ln is not None:
        normalized_shape, ln_weight, ln_bias, eps = ln
        layer_norm = extension.LayerNorm(list(normalized_shape), ln_weight, ln_bias, float(eps))
        tensors = [*tensors, ln_weight, ln_bias]
    watched = [t for t in tensors if t is not None]
    if any(t.is_inference() for t in watched):
        return None
    return make(dense, layer_norm, watched)


def _prepared(
    extension: Any, layer: nn.Module, like: torch.Tensor
) -> tuple[Callable, torch.dtype, list] | None:
    """``(make(dense, layer_norm, watched), dtype, weights)`` for the layer's prepared eval path
    in ``like``'s dtype and device, or None where the Python path would not take it."""
    probe = like.new_empty(0, layer.hidden_size)
    if type(layer) is AdapterFusionLayer:
        attrs = layer.__dict__
        if attrs["residual_before"] or attrs["T"] != 1.0 or attrs["backend"] not in _FOLDING_BACKENDS:
            return None
        plan = layer._eval_fold(probe, probe, None)
        if plan is None or not plan.fold.merged or plan.fold.residual_value is not None:
            return None
        f = plan.fold

        def make_fusion(dense: Any, layer_norm: Any, watched: list) -> Any:
            return extension.fusion_site(
                dense, layer_norm, f.weight, f.bias, f.value, f.num_sources, f.block, f.activation, watched
            )

        return make_fusion, f.weight.dtype, layer._weights()
    plan = layer._inference_plan(probe)
    folded = None if plan is None else plan.folded_weights()
    if folded is None:
        return None
    activation = layer.__dict__["activation"]

    def make_scalearn(dense: Any, layer_norm: Any, watched: list) -> Any:
        return extension.scalearn_site(dense, layer_norm, *folded, activation, watched)

    return make_scalearn, folded[0].dtype, list(layer._parameters.values())
