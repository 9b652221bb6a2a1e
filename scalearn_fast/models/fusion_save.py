"""``save_fusion``: a model's attached AdapterFusion as the `adapters` library's
``save_adapter_fusion`` folder, which ``attach_fusion(model, sources, folder)`` (and the library's
``load_adapter_fusion``) read back."""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from ..formats.adapterhub import adapter_key_prefix
from ..formats.atomic import atomic_write_json, atomic_write_tensors
from ..formats.fusion import CONFIG_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME
from .fusion import fusion_layers, fusion_state
from .registry import hidden_size

_PROJECTIONS = ("query", "key", "value")


def save_fusion(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``adapter_fusion_config.json`` and ``model_adapter_fusion.safetensors`` (keys
    ``{site}.adapter_fusion_layer.{name}.{query|key|value}.{weight|bias}``, as the library names
    them) for the fusion ``attach_fusion`` put on ``model``. Returns the folder."""
    state = fusion_state(model)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    name = state.name or ",".join(state.source_names)
    tensors = {}
    for site, layer in zip(state.sites, fusion_layers(model), strict=True):
        prefix = f"{adapter_key_prefix(site.name, site.style)}.adapter_fusion_layer.{name}"
        for proj in _PROJECTIONS:
            module = getattr(layer, proj)
            if module is not None:
                for key, param in module.named_parameters():
                    tensors[f"{prefix}.{proj}.{key}"] = param
    config = getattr(model, "config", None)
    meta = {
        "name": name,
        "adapter_names": list(state.source_names),
        "config": dict(state.config),
        "hidden_size": hidden_size(model),
        "model_type": getattr(config, "model_type", None),
        "model_class": type(model).__name__,
        "model_name": getattr(config, "name_or_path", "") or "",
    }
    (folder / WEIGHTS_NAME).unlink(missing_ok=True)  # a stale .bin would shadow nothing, but mislead
    atomic_write_tensors(folder / SAFE_WEIGHTS_NAME, tensors)
    atomic_write_json(folder / CONFIG_NAME, meta)
    return folder
