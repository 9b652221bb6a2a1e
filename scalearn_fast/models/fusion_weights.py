"""Read an `adapters` AdapterFusion checkpoint (``save_adapter_fusion``'s folder).

The folder holds ``adapter_fusion_config.json`` (``name``, ``adapter_names``, ``config``,
``hidden_size``, ...) and the weights as ``model_adapter_fusion.safetensors`` or
``pytorch_model_adapter_fusion.bin``, keyed
``[prefix.]encoder.layer.{l}.output.adapter_fusion_layer.{name}.{query|key|value}.{weight|bias}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CONFIG_NAME = "adapter_fusion_config.json"
WEIGHTS_NAME = "pytorch_model_adapter_fusion.bin"
SAFE_WEIGHTS_NAME = "model_adapter_fusion.safetensors"

_KEY = re.compile(
    r"(?:^|\.)layers?\.(\d+)\..*adapter_fusion_layer\.(.+)\.((?:query|key|value)\.(?:weight|bias))$"
)


@dataclass
class FusionCheckpoint:
    """One saved AdapterFusion: its config and, per transformer layer, a ``BertFusion`` state dict."""

    name: str
    adapter_names: list[str]
    config: dict[str, Any]
    hidden_size: int | None = None
    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def split_fusion_state_dict(state_dict: dict[str, torch.Tensor], name: str | None = None):
    """``{layer index: {"query.weight": ..., ...}}`` from a flat fusion state dict; ``name``
    (the fusion's, e.g. ``"a,b,c"``) filters when the dict holds several fusions."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _KEY.search(key)
        if match is None:
            continue
        layer, fusion_name, param = int(match.group(1)), match.group(2), match.group(3)
        if name is not None and fusion_name != name:
            continue
        layers.setdefault(layer, {})[param] = tensor
    return layers


def load_fusion_checkpoint(path: str | Path) -> FusionCheckpoint:
    """Read ``save_adapter_fusion``'s folder (safetensors preferred over the .bin)."""
    folder = Path(path)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(
            f"fusion_weights={str(path)!r} has no {CONFIG_NAME} (an adapters save_adapter_fusion folder)"
        )
    meta = json.loads(config_file.read_text())
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / SAFE_WEIGHTS_NAME))
    elif (folder / WEIGHTS_NAME).is_file():
        state = torch.load(folder / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"fusion_weights={str(path)!r} holds neither {SAFE_WEIGHTS_NAME} nor {WEIGHTS_NAME}")
    name = meta.get("name") or ",".join(meta.get("adapter_names", []))
    layers = split_fusion_state_dict(state, name)
    if not layers:
        raise ValueError(
            f"fusion_weights={str(path)!r}: no adapter_fusion_layer.{name}.* weights in the file"
        )
    return FusionCheckpoint(
        name=name,
        adapter_names=list(meta.get("adapter_names", name.split(","))),
        config=dict(meta.get("config", {})),
        hidden_size=meta.get("hidden_size"),
        layers=layers,
    )
