"""``attach_fusion`` / ``detach_fusion``: the `adapters` library's AdapterFusion inside a transformers
model, per instance, on the same site registry and patcher as ``attach_scalearn``.

Every FFN output sub-layer found by ``registry.ffn_sites`` gets an ``AdapterFusionLayer`` built
from that layer's source adapters and, when given, that layer's ``BertFusion`` weights from an
``adapters`` ``save_adapter_fusion`` folder. The sources are frozen; the fusion's query/key/value
(and the task head) train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..formats.adapterhub import load_adapterhub_sources
from ..formats.fusion import (
    CONFIG_NAME,
    FUSION_CONFIGS,
    FusionCheckpoint,
    fusion_from_state_dict,
    load_fusion_checkpoint,
    resolve_fusion_config,
)
from ..formats.keys import SiteKey
from ..layers_fusion import AdapterFusionLayer, fusion_options_from_config
from .attach import (
    FUSION,
    AttachKind,
    AttachRecord,
    attach,
    check_not_attached,
    check_sites_free,
    check_sources_fit,
    detach,
    site_layer,
)
from .registry import FFNSite, ffn_sites, hidden_size

ATTR = FUSION  # name of the AdapterFusionLayer on each patched module
_PARAMS = ("query", "key", "value")
FusionState = AttachRecord


_KIND: AttachKind[AdapterFusionLayer] = AttachKind(FUSION)
fusion_state = _KIND.record
is_fusion_attached = _KIND.attached
fusion_layers = _KIND.layers


def fusion_regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over layers of the library's ``0.01·‖I - W_v‖²`` (None without trainable values)."""
    if not fusion_state(model).config.get("regularization", True):
        return None
    losses = [r for r in (layer.regularization_loss() for layer in fusion_layers(model)) if r is not None]
    return torch.stack(losses).sum() if losses else None


def _default_dropout(model: nn.Module) -> float:
    """The model's attention dropout, as the library's ``attention_probs_dropout_prob`` alias."""
    config = model.config
    for attr in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"):
        value = getattr(config, attr, None)
        if isinstance(value, int | float):
            return float(value)
    return 0.0


def _site(key: Any) -> SiteKey:
    if isinstance(key, tuple):
        return key  # type: ignore[return-value]
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        return ("encoder", int(key))
    raise ValueError(f"fusion_weights key {key!r}: expected a layer index or (stack, index)")


def _as_checkpoint(fusion_weights: Any, trust_pickle: bool) -> FusionCheckpoint:
    """A ``FusionCheckpoint`` from any accepted ``fusion_weights`` (config {} when unknown)."""
    if isinstance(fusion_weights, str | Path):
        return load_fusion_checkpoint(fusion_weights, trust_pickle=trust_pickle)
    if isinstance(fusion_weights, FusionCheckpoint):
        return fusion_weights
    if isinstance(fusion_weights, Mapping):
        if fusion_weights and all(isinstance(k, str) and not k.isdigit() for k in fusion_weights):
            return fusion_from_state_dict(fusion_weights)
        sites = {_site(k): dict(sd) for k, sd in fusion_weights.items()}
        return FusionCheckpoint(name="", adapter_names=[], config={}, sites=sites)
    raise ValueError(
        f"fusion_weights is a {type(fusion_weights).__name__}; expected None, a save_adapter_fusion "
        f"folder ({CONFIG_NAME} + weights), a FusionCheckpoint or a state dict"
    )


def _load_layer(layer: AdapterFusionLayer, state: Mapping[str, torch.Tensor], where: str) -> None:
    own = {k: v for k, v in layer.state_dict().items() if k.split(".")[0] in _PARAMS}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(
            f"fusion weights for {where} do not fit the fusion config: missing {missing}, unexpected {extra}"
        )
    with torch.no_grad():
        for key, dst in own.items():
            src = state[key]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"fusion weight {key} for {where} has shape {list(src.shape)}, the model needs "
                    f"{list(dst.shape)} (hidden size d={layer.hidden_size})"
                )
            dst.copy_(src.to(dtype=dst.dtype, device=dst.device))


def check_fusion_fits_sites(model: nn.Module, sites: Sequence[FFNSite], options: Mapping[str, Any]) -> None:
    """``residual_before`` and ``query_before_ln`` need the FFN output h apart from its residual
    x; sites that only see ``h + x`` (``FFNSite.splits_residual``) cannot give them."""
    flags = [flag for flag in ("residual_before", "query_before_ln") if options.get(flag)]
    joined = [s for s in sites if not s.splits_residual]
    if flags and joined:
        raise ValueError(
            f"fusion config {'/'.join(flags)}=True needs the FFN output apart from its residual, but "
            f"{type(model).__name__} ({sites[0].style!r} sites, e.g. {joined[0].name}) only exposes their "
            "sum; use a fusion config without it"
        )


def attach_fusion(
    model: nn.Module,
    sources: Sequence[Any] | Mapping[str, Any] | str,
    fusion_weights: Any = None,
    *,
    backend: str = "auto",
    fusion_config: Mapping[str, Any] | str | None = None,
    freeze: bool = True,
    trust_pickle: bool = False,
) -> nn.Module:
    """Inject N source adapters + AdapterFusion after every FFN output sub-layer of ``model``.

    ``sources``: as for ``attach_scalearn`` (AdapterHub folders, ``{name: folder}``,
    ``AdapterSource`` objects, per-layer tensors). ``fusion_weights``: an ``adapters``
    ``save_adapter_fusion`` folder, a ``FusionCheckpoint``, a flat library state dict, or
    ``{layer index or (stack, index): {"query.weight": ...}}``; None starts fresh fusion weights
    initialised as the library does. ``fusion_config``: the library's config dict or
    ``"dynamic"``/``"static"``; defaults to the checkpoint's, else ``"dynamic"``. Score dropout
    defaults to the model's ``attention_probs_dropout_prob`` like the library. With ``freeze``
    (default) only the fusion weights and the task head train. ``.bin`` files are read without
    unpickling Python objects; ``trust_pickle=True`` allows that, for legacy files you trust.
    Works under ``model.gradient_checkpointing_enable()`` (reentrant or not). Returns ``model``
    (patched in place).
    """
    check_not_attached(model, FUSION)
    srcs = load_adapterhub_sources(sources, trust_pickle=trust_pickle)
    sites = ffn_sites(model)
    check_sites_free(sites)
    d = hidden_size(model)
    ckpt = None if fusion_weights is None else _as_checkpoint(fusion_weights, trust_pickle)
    config = resolve_fusion_config(
        fusion_config if fusion_config is not None else (ckpt and ckpt.config) or None
    )
    if ckpt is not None and ckpt.hidden_size is not None and ckpt.hidden_size != d:
        raise ValueError(f"the fusion checkpoint has hidden_size {ckpt.hidden_size}, the model has d={d}")

    names = [s.name for s in srcs]
    adapter_names = ckpt.adapter_names if ckpt is not None and ckpt.adapter_names else None
    if adapter_names is not None:
        if len(adapter_names) != len(srcs):
            raise ValueError(
                f"the fusion checkpoint fuses {len(adapter_names)} adapters {adapter_names}, "
                f"but {len(srcs)} sources were given {names}"
            )
        if sorted(adapter_names) != sorted(names):
            raise ValueError(
                f"the fusion checkpoint fuses {adapter_names}, the sources are named {names} "
                "(pass sources as {name: folder} to rename)"
            )
        srcs = [srcs[names.index(n)] for n in adapter_names]  # the library's order
        names = list(adapter_names)
    activation = check_sources_fit(model, srcs, sites, d)
    wanted = {s.key for s in sites}
    if ckpt is not None:
        missing, extra = sorted(wanted - set(ckpt.sites)), sorted(set(ckpt.sites) - wanted)
        if missing or extra:
            raise ValueError(
                f"fusion weights do not fit {type(model).__name__}: missing layers {missing}, "
                f"unknown layers {extra}"
            )

    options = fusion_options_from_config(config, _default_dropout(model))
    check_fusion_fits_sites(model, sites, options)
    if not config.get("dropout_prob"):  # the library: ``dropout_prob or attention_probs_dropout_prob``
        options["dropout"] = _default_dropout(model)
    param = next(model.parameters())

    def build(site: FFNSite) -> AdapterFusionLayer:
        layer = site_layer(
            AdapterFusionLayer, srcs, site, activation=activation, backend=backend, like=param, cast=True,
            **options,
        )  # fmt: skip
        if ckpt is not None:
            _load_layer(layer, ckpt.sites[site.key], f"{site.stack} layer {site.index}")
        return layer

    name = (ckpt.name if ckpt is not None else "") or ",".join(names)
    record = AttachRecord.over(FUSION, srcs, sites, backend, name=name, config=config)
    trainable = lambda: [p for layer in fusion_layers(model) for p in layer.fusion_parameters()]  # noqa: E731
    return attach(model, record, build, trainable, freeze=freeze)


def detach_fusion(model: nn.Module) -> nn.Module:
    """Undo ``attach_fusion``: original forwards and ``requires_grad`` flags come back."""
    detach(model, FUSION)
    return model


__all__ = [
    "FUSION_CONFIGS",
    "attach_fusion",
    "detach_fusion",
    "fusion_layers",
    "fusion_regularization_loss",
    "fusion_state",
    "is_fusion_attached",
]
