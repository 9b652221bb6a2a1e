"""``attach_scalearn`` / ``detach_scalearn``: ScaLearn inside a transformers model, per instance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..layers import ScaLearnLayer, check_variant, init_omega, is_shared
from .attach import check_sources_fit, head_parameters, patch_sites
from .patching import LayerNormRef, restore_sites
from .registry import FFNSite, ffn_sites, hidden_size

ATTR = "scalearn"  # name of the ScaLearnLayer on each patched module
_STATE = "_scalearn_fast_state"


@dataclass
class AttachState:
    variant: str
    source_names: list[str]
    sites: list[FFNSite]
    backend: str
    requires_grad: dict[str, bool] = field(default_factory=dict)
    shared_omega: nn.Parameter | None = None


def attach_state(model: nn.Module) -> AttachState:
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no ScaLearn attached; call attach_scalearn first")
    return state


def is_attached(model: nn.Module) -> bool:
    return _STATE in model.__dict__


def scalearn_layers(model: nn.Module) -> list[ScaLearnLayer]:
    return [getattr(site.module, ATTR) for site in attach_state(model).sites]


def omega_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for layer in scalearn_layers(model):
        seen.setdefault(id(layer.omega), layer.omega)
    return list(seen.values())


def _as_tuple(weights: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if hasattr(weights, "w_down"):
        return weights.w_down, weights.b_down, weights.w_up, weights.b_up
    return tuple(weights)  # type: ignore[return-value]


def attach_scalearn(
    model: nn.Module,
    sources: Any,
    variant: str = "scalearn",
    backend: str = "auto",
    *,
    omega_dropout: float | None = None,
    freeze: bool = True,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Inject N source adapters + ScaLearn after every FFN output sub-layer of ``model``.

    ``sources``: AdapterHub folders (list or ``{name: folder}``), ``AdapterSource`` objects,
    or ``{name: {layer index or (stack, index): (w_down, b_down, w_up, b_up)}}``.
    With ``freeze`` (default) only ω and the task head train. Returns ``model`` (patched in place).
    New ScaLearn layers take the patched modules' train/eval mode. Save with ``save_scalearn``;
    ``detach_scalearn`` before ``save_pretrained`` (a ``++`` variant's one ω shows under every
    layer's name, which ``save_pretrained`` refuses as shared tensors).
    """
    from ..io import load_adapterhub_sources

    check_variant(variant)
    if is_attached(model):
        raise RuntimeError("ScaLearn is already attached to this model; detach_scalearn it first")
    srcs = load_adapterhub_sources(sources)
    sites = ffn_sites(model)
    d = hidden_size(model)
    activation = check_sources_fit(model, srcs, sites, d)
    param = next(model.parameters())
    shared = None
    if is_shared(variant):
        shared = init_omega(len(srcs), d, variant, device=param.device, generator=generator)
    names = [s.name for s in srcs]

    def build(site: FFNSite) -> ScaLearnLayer:
        ws = [_as_tuple(s.layers[site.key]) for s in srcs]
        omega = shared
        if omega is None:
            omega = init_omega(len(srcs), d, variant, device=param.device, generator=generator)
        return ScaLearnLayer(
            [w[0] for w in ws],
            [w[1] for w in ws],
            [w[2] for w in ws],
            [w[3] for w in ws],
            variant=variant,
            omega=omega,
            activation=activation,
            omega_dropout=omega_dropout,
            backend=backend,
            layer_norm=LayerNormRef(site.layer_norm),  # type: ignore[arg-type]
            source_names=names,
        ).to(device=param.device)

    requires_grad = patch_sites(model, sites, ATTR, build, freeze=freeze)
    model.__dict__[_STATE] = AttachState(variant, names, sites, backend, requires_grad, shared)
    if freeze:
        for p in [*(p for _, p in head_parameters(model)), *omega_parameters(model)]:
            p.requires_grad_(True)
    return model


def detach_scalearn(model: nn.Module) -> nn.Module:
    """Undo ``attach_scalearn``: original forwards and ``requires_grad`` flags come back."""
    state = attach_state(model)
    restore_sites(model, state.sites, ATTR, state.requires_grad)
    del model.__dict__[_STATE]
    return model
