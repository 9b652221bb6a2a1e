"""``attach_scalearn`` / ``detach_scalearn``: ScaLearn inside a transformers model, per instance."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..formats.adapterhub import load_adapterhub_sources
from ..layers import ScaLearnLayer, check_variant, init_omega, is_shared
from .attach import (
    SCALEARN,
    AttachKind,
    AttachRecord,
    attach,
    detach,
    head_parameters,  # noqa: F401  (re-exported)
    site_layer,
)
from .registry import FFNSite

ATTR = SCALEARN  # name of the ScaLearnLayer on each patched module
AttachState = AttachRecord


_KIND: AttachKind[ScaLearnLayer] = AttachKind(SCALEARN)
attach_state = _KIND.record
is_attached = _KIND.attached
scalearn_layers = _KIND.layers


def omega_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for layer in scalearn_layers(model):
        seen.setdefault(id(layer.omega), layer.omega)
    return list(seen.values())


def shared_omega(model: nn.Module) -> torch.Tensor:
    """The one ω of a ``++`` variant, read from the layers (not from the attach record): a
    ``load_state_dict(..., assign=True)`` gives every layer a Parameter of its own, so the
    layers must be checked to still agree."""
    variant = attach_state(model).variant
    layers = scalearn_layers(model)
    first = layers[0].omega
    for i, layer in enumerate(layers[1:], start=1):
        if layer.omega is not first and not torch.equal(layer.omega, first):
            raise ValueError(
                f"{variant} shares one omega across layers, but layer {i} holds a different one "
                f"(was the model loaded with load_state_dict(..., assign=True) or trained with "
                "per-layer copies?); load it with load_scalearn, or re-attach"
            )
    return first


class SharedOmegaSavePretrained:
    """``save_pretrained`` of a model holding a ``++`` variant: the one ω is registered under
    every layer's name, which transformers refuses as shared tensors, so the state dict it gets
    keeps ω once (under the first layer's name). Loading that back into an attached model with
    ``load_state_dict(..., strict=False)`` restores ω in every layer (they share it)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: Any, *args: Any, state_dict: Any = None, **kwargs: Any) -> Any:
        model = self.model
        if state_dict is None:
            state_dict = model.state_dict()
        if is_attached(model) and is_shared(attach_state(model).variant):
            shared_omega(model)  # the layers must still agree
            keys = [f"{site.name}.{ATTR}.omega" for site in attach_state(model).sites]
            state_dict = {k: v for k, v in state_dict.items() if k not in keys[1:]}
        return type(model).save_pretrained(model, save_directory, *args, state_dict=state_dict, **kwargs)


def attach_scalearn(
    model: nn.Module,
    sources: Sequence[Any] | Mapping[str, Any] | str | os.PathLike[str],
    variant: str = "scalearn",
    backend: str = "auto",
    *,
    omega_dropout: float | None = None,
    freeze: bool = True,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Inject N source adapters + ScaLearn after every FFN output sub-layer of ``model``.

    ``sources``: AdapterHub folders (a list, ``{name: folder}``, or one folder as a string),
    ``AdapterSource`` objects, or ``{name: {layer index or (stack, index): (w_down, b_down,
    w_up, b_up)}}``. The folders are recorded, so ``save_scalearn`` can name them for
    ``load_scalearn``. With ``freeze`` (default) only ω and the task head train. Returns
    ``model`` (patched in place). New ScaLearn layers take the patched modules' train/eval mode.
    Works under ``model.gradient_checkpointing_enable()`` (reentrant or not). Save with
    ``save_scalearn``; ``save_pretrained`` also works (a ``++`` variant's ω is stored once).
    """
    check_variant(variant)
    srcs = load_adapterhub_sources(sources)
    sites, d, activation = _KIND.fit_sources(model, srcs)
    param = next(model.parameters())
    shared = None
    if is_shared(variant):
        shared = init_omega(len(srcs), d, variant, device=param.device, generator=generator)

    def build(site: FFNSite) -> ScaLearnLayer:
        omega = shared
        if omega is None:
            omega = init_omega(len(srcs), d, variant, device=param.device, generator=generator)
        return site_layer(
            ScaLearnLayer, srcs, site, activation=activation, backend=backend, like=param,
            variant=variant, omega=omega, omega_dropout=omega_dropout,
        )  # fmt: skip

    record = AttachRecord.over(SCALEARN, srcs, sites, backend, variant=variant, shared_omega=shared)
    attach(model, record, build, lambda: omega_parameters(model), freeze=freeze)
    if shared is not None and hasattr(type(model), "save_pretrained"):
        model.__dict__["save_pretrained"] = SharedOmegaSavePretrained(model)
    return model


def detach_scalearn(model: nn.Module) -> nn.Module:
    """Undo ``attach_scalearn``: original forwards and ``requires_grad`` flags come back."""
    detach(model, SCALEARN)
    if isinstance(model.__dict__.get("save_pretrained"), SharedOmegaSavePretrained):
        del model.__dict__["save_pretrained"]
    return model
