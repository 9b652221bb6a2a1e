"""``attach_fusion`` / ``detach_fusion``: the `adapters` library's AdapterFusion inside a transformers
model, per instance, on the same site registry and patcher as ``attach_scalearn``.

Every FFN output sub-layer found by ``registry.ffn_sites`` gets an ``AdapterFusionLayer`` built
from that layer's source adapters and, when given, that layer's ``BertFusion`` weights from an
``adapters`` ``save_adapter_fusion`` folder. The sources are frozen; the fusion's query/key/value
(and the task head) train.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..layers_fusion import AdapterFusionLayer, fusion_options_from_config
from .attach import check_sites_free, check_sources_fit, head_parameters, patch_sites
from .fusion_weights import (
    CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    FusionCheckpoint,
    load_fusion_checkpoint,
)
from .patching import LayerNormRef, restore_sites
from .registry import FFNSite, ffn_sites, hidden_size, site_key

ATTR = "adapter_fusion"  # name of the AdapterFusionLayer on each patched module
_STATE = "_scalearn_fast_fusion_state"
_PARAMS = ("query", "key", "value")

# The library's two named fusion configs (adapters.configuration.adapter_fusion_config).
FUSION_CONFIGS: dict[str, dict[str, Any]] = {
    "dynamic": dict(
        key=True, query=True, value=True, query_before_ln=False, regularization=True,
        residual_before=False, temperature=False, value_before_softmax=True,
        value_initialized=True, dropout_prob=None,
    ),
    "static": dict(
        key=True, query=True, value=False, query_before_ln=False, regularization=False,
        residual_before=False, temperature=False, value_before_softmax=True,
        value_initialized=False, dropout_prob=None,
    ),
}  # fmt: skip


@dataclass
class FusionState:
    name: str
    source_names: list[str]
    sites: list[FFNSite]
    backend: str
    config: dict[str, Any]
    requires_grad: dict[str, bool] = field(default_factory=dict)


def fusion_state(model: nn.Module) -> FusionState:
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no AdapterFusion attached; call attach_fusion first")
    return state


def is_fusion_attached(model: nn.Module) -> bool:
    return _STATE in model.__dict__


def fusion_layers(model: nn.Module) -> list[AdapterFusionLayer]:
    return [getattr(site.module, ATTR) for site in fusion_state(model).sites]


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


def _resolve_config(config: Mapping[str, Any] | str | None) -> dict[str, Any]:
    if config is None:
        config = "dynamic"
    if isinstance(config, str):
        if config not in FUSION_CONFIGS:
            raise ValueError(f"fusion_config {config!r} is not one of {sorted(FUSION_CONFIGS)} or a dict")
        return dict(FUSION_CONFIGS[config])
    if not isinstance(config, Mapping):
        raise ValueError(f"fusion_config is a {type(config).__name__}; expected a dict or a name")
    out = dict(FUSION_CONFIGS["dynamic"])
    out.update(config)
    return out


def _split_by_site(
    state: Mapping[str, torch.Tensor], name: str
) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """``{(stack, index): BertFusion state dict}`` from a flat library fusion state dict."""
    marker = f".adapter_fusion_layer.{name}."
    out: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        pos = key.find(marker)
        if pos < 0:
            continue
        where = site_key(key[:pos])
        param = key[pos + len(marker) :]
        if where is None or param.split(".")[0] not in _PARAMS:
            continue
        out.setdefault(where, {})[param] = tensor
    return out


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / SAFE_WEIGHTS_NAME))
    return torch.load(folder / WEIGHTS_NAME, map_location="cpu", weights_only=True)


def _load_fusion(
    fusion_weights: Any, sites: list[FFNSite]
) -> tuple[str | None, list[str] | None, dict[str, Any] | None, int | None, dict[tuple[str, int], dict]]:
    """(name, adapter names, config, hidden size, per-site state dicts) from what the user passed."""
    stacks = {s.stack for s in sites}
    if isinstance(fusion_weights, str | Path):
        ckpt = load_fusion_checkpoint(fusion_weights)  # validates the folder, reads the metadata
        if stacks == {"encoder"}:
            per_site = {("encoder", i): sd for i, sd in ckpt.layers.items()}
        else:  # encoder + decoder share layer indices: split again by stack
            per_site = _split_by_site(_read_state(Path(fusion_weights)), ckpt.name)
        return ckpt.name, ckpt.adapter_names, ckpt.config, ckpt.hidden_size, per_site
    if isinstance(fusion_weights, FusionCheckpoint):
        per_site = {("encoder", i): sd for i, sd in fusion_weights.layers.items()}
        return (
            fusion_weights.name,
            fusion_weights.adapter_names,
            fusion_weights.config,
            fusion_weights.hidden_size,
            per_site,
        )
    if isinstance(fusion_weights, Mapping):
        if fusion_weights and all(isinstance(k, str) for k in fusion_weights):
            names = {k.split(".adapter_fusion_layer.")[1].rsplit(".", 2)[0] for k in fusion_weights if
                     ".adapter_fusion_layer." in k}  # fmt: skip
            if len(names) != 1:
                raise ValueError(
                    f"fusion_weights state dict holds fusions {sorted(names)}; expected exactly one"
                )
            name = names.pop()
            return name, name.split(","), None, None, _split_by_site(fusion_weights, name)
        per_site = {}
        for k, sd in fusion_weights.items():
            per_site[k if isinstance(k, tuple) else ("encoder", int(k))] = dict(sd)
        return None, None, None, None, per_site
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


def attach_fusion(
    model: nn.Module,
    sources: Any,
    fusion_weights: Any = None,
    *,
    backend: str = "auto",
    fusion_config: Mapping[str, Any] | str | None = None,
    freeze: bool = True,
) -> nn.Module:
    """Inject N source adapters + AdapterFusion after every FFN output sub-layer of ``model``.

    ``sources``: as for ``attach_scalearn`` (AdapterHub folders, ``{name: folder}``,
    ``AdapterSource`` objects, per-layer tensors). ``fusion_weights``: an ``adapters``
    ``save_adapter_fusion`` folder, a ``FusionCheckpoint``, a flat library state dict, or
    ``{layer index or (stack, index): {"query.weight": ...}}``; None starts fresh fusion weights
    initialised as the library does. ``fusion_config``: the library's config dict or
    ``"dynamic"``/``"static"``; defaults to the checkpoint's, else ``"dynamic"``. Score dropout
    defaults to the model's ``attention_probs_dropout_prob`` like the library. With ``freeze``
    (default) only the fusion weights and the task head train. Returns ``model`` (patched in place).
    """
    from ..io import load_adapterhub_sources

    if is_fusion_attached(model):
        raise RuntimeError("AdapterFusion is already attached to this model; detach_fusion it first")
    srcs = load_adapterhub_sources(sources)
    sites = ffn_sites(model)
    check_sites_free(sites)
    d = hidden_size(model)
    name, adapter_names, ckpt_config, ckpt_d, per_site = (None, None, None, None, {})
    if fusion_weights is not None:
        name, adapter_names, ckpt_config, ckpt_d, per_site = _load_fusion(fusion_weights, sites)
    config = _resolve_config(fusion_config if fusion_config is not None else ckpt_config)
    if ckpt_d is not None and ckpt_d != d:
        raise ValueError(f"the fusion checkpoint has hidden_size {ckpt_d}, the model has d={d}")

    names = [s.name for s in srcs]
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
    if fusion_weights is not None:
        missing, extra = sorted(wanted - set(per_site)), sorted(set(per_site) - wanted)
        if missing or extra:
            raise ValueError(
                f"fusion weights do not fit {type(model).__name__}: missing layers {missing}, "
                f"unknown layers {extra}"
            )

    options = fusion_options_from_config(config, _default_dropout(model))
    if not config.get("dropout_prob"):  # the library: ``dropout_prob or attention_probs_dropout_prob``
        options["dropout"] = _default_dropout(model)
    param = next(model.parameters())

    def build(site: FFNSite) -> AdapterFusionLayer:
        ws = [s.layers[site.key] for s in srcs]
        layer = AdapterFusionLayer(
            [w[0] for w in ws],
            [w[1] for w in ws],
            [w[2] for w in ws],
            [w[3] for w in ws],
            activation=activation,
            backend=backend,
            layer_norm=LayerNormRef(site.layer_norm),  # type: ignore[arg-type]
            source_names=names,
            **options,
        ).to(device=param.device, dtype=param.dtype)
        if fusion_weights is not None:
            _load_layer(layer, per_site[site.key], f"{site.stack} layer {site.index}")
        return layer

    requires_grad = patch_sites(model, sites, ATTR, build, freeze=freeze)
    state = FusionState(name or ",".join(names), names, sites, backend, config, requires_grad)
    model.__dict__[_STATE] = state
    if freeze:
        fusion = [p for layer in fusion_layers(model) for p in layer.fusion_parameters()]
        for p in [*(p for _, p in head_parameters(model)), *fusion]:
            p.requires_grad_(True)
    return model


def detach_fusion(model: nn.Module) -> nn.Module:
    """Undo ``attach_fusion``: original forwards and ``requires_grad`` flags come back."""
    state = fusion_state(model)
    restore_sites(model, state.sites, ATTR, state.requires_grad)
    del model.__dict__[_STATE]
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
