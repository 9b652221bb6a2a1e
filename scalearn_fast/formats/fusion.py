"""`adapters` AdapterFusion checkpoints: ``save_adapter_fusion``'s folder and flat state dicts.

The folder holds ``adapter_fusion_config.json`` (``name``, ``adapter_names``, ``config``,
``hidden_size``, ...) and the weights as ``model_adapter_fusion.safetensors`` or
``pytorch_model_adapter_fusion.bin``, keyed
``[prefix.]encoder.layer.{l}.output.adapter_fusion_layer.{name}.{query|key|value}.{weight|bias}``
(BART, mBART: ``{encoder|decoder}.layers.{l}.output_adapters...``; T5, mT5:
``{encoder|decoder}.block.{l}.layer.{1|2}...``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import read_json, read_tensors, weights_file
from .keys import SiteKey, site_key

CONFIG_NAME = "adapter_fusion_config.json"
WEIGHTS_NAME = "pytorch_model_adapter_fusion.bin"
SAFE_WEIGHTS_NAME = "model_adapter_fusion.safetensors"

_MARKER = ".adapter_fusion_layer."
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


def resolve_fusion_config(config: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """A full fusion config dict from a name (``"dynamic"``/``"static"``), a partial dict
    (over ``"dynamic"``) or None (``"dynamic"``)."""
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


@dataclass
class FusionCheckpoint:
    """One saved AdapterFusion: its config and, per site ``(stack, layer index)``, a
    ``BertFusion`` state dict (``{"query.weight": ..., ...}``)."""

    name: str
    adapter_names: list[str]
    config: dict[str, Any]
    hidden_size: int | None = None
    sites: dict[SiteKey, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def layers(self) -> dict[int, dict[str, torch.Tensor]]:
        """The encoder's sites by layer index."""
        return {index: sd for (stack, index), sd in self.sites.items() if stack == "encoder"}


def split_fusion_state_dict(
    state: Mapping[str, torch.Tensor], name: str | None = None
) -> dict[str, dict[SiteKey, dict[str, torch.Tensor]]]:
    """``{fusion name: {(stack, index): {"query.weight": ...}}}`` from a flat fusion state dict;
    ``name`` keeps that fusion only. Keys that are not fusion weights are skipped."""
    out: dict[str, dict[SiteKey, dict[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        pos = key.find(_MARKER)
        if pos < 0:
            continue
        where = site_key(key[:pos])
        parts = key[pos + len(_MARKER) :].rsplit(".", 2)
        if where is None or len(parts) != 3 or parts[1] not in _PARAMS:
            continue
        fusion, param = parts[0], f"{parts[1]}.{parts[2]}"
        if name is not None and fusion != name:
            continue
        out.setdefault(fusion, {}).setdefault(where, {})[param] = tensor
    return out


def fusion_from_state_dict(
    state: Mapping[str, torch.Tensor], where: str = "fusion_weights"
) -> FusionCheckpoint:
    """A ``FusionCheckpoint`` (no config) from a flat library state dict holding one fusion."""
    fusions = split_fusion_state_dict(state)
    if len(fusions) != 1:
        raise ValueError(f"{where} state dict holds fusions {sorted(fusions)}; expected exactly one")
    name, sites = next(iter(fusions.items()))
    return FusionCheckpoint(name=name, adapter_names=name.split(","), config={}, sites=sites)


def _meta_field(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], config_file: Path) -> Any:
    value = meta.get(key)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{config_file}: {key!r} is {value!r}; expected {getattr(kind, '__name__', kind)}")
    return value


def load_fusion_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> FusionCheckpoint:
    """Read ``save_adapter_fusion``'s folder (safetensors preferred over the .bin)."""
    folder = Path(path)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(
            f"fusion_weights={str(path)!r} has no {CONFIG_NAME} (an adapters save_adapter_fusion folder)"
        )
    meta = read_json(config_file)
    weights = weights_file(folder, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, f"fusion_weights={str(path)!r}")
    adapter_names = _meta_field(meta, "adapter_names", list, config_file)
    if adapter_names is not None and not all(isinstance(n, str) for n in adapter_names):
        raise ValueError(f"{config_file}: 'adapter_names' is {adapter_names!r}; expected a list of strings")
    name = _meta_field(meta, "name", str, config_file) or ",".join(adapter_names or [])
    config = _meta_field(meta, "config", dict, config_file) or {}
    hidden = _meta_field(meta, "hidden_size", int, config_file)
    state = read_tensors(weights, trust_pickle=trust_pickle)
    sites = split_fusion_state_dict(state, name).get(name, {})
    if not sites:
        raise ValueError(f"{weights}: no adapter_fusion_layer.{name}.* weights in the file")
    return FusionCheckpoint(
        name=name,
        adapter_names=list(adapter_names or name.split(",")),
        config=dict(config),
        hidden_size=hidden,
        sites=sites,
    )
