"""PEFT LoRA folders (``save_pretrained`` of a ``LoraConfig`` model): ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``adapter_model.bin``), read as fixed experts of a LoRA mixture.

A folder's weights are keyed ``<prefix>.<module>.lora_A.weight`` ``[r, d_in]`` and
``...lora_B.weight`` ``[d_out, r]``; the LoRA adds ``scaling · B·A·x`` to the module's output,
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).

Only what a mixture computes exactly is read: configs that change the function beyond that
(DoRA, trained biases, fan-in-fan-out weights, per-module rank/alpha patterns, extra trained
modules, ...) are refused with the field named. ``lora_dropout`` is accepted: it only acts
while PEFT trains; a mixture evaluates the LoRA without it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import read_json, read_tensors, weights_file

PEFT_CONFIG = "adapter_config.json"
PEFT_SAFE = "adapter_model.safetensors"
PEFT_BIN = "adapter_model.bin"

# (field, the values a mixture can compute exactly): anything else is refused, naming the field.
_EXACT_ONLY: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("use_dora", (None, False)),
    ("bias", (None, "none")),
    ("lora_bias", (None, False)),
    ("fan_in_fan_out", (None, False)),
    ("rank_pattern", (None, {})),
    ("alpha_pattern", (None, {})),
    ("modules_to_save", (None, [])),
    ("layers_to_transform", (None, [])),
    ("layer_replication", (None, [])),
    ("trainable_token_indices", (None, [], {})),
    ("target_parameters", (None, [])),
    ("alora_invocation_tokens", (None, [])),
    ("use_qalora", (None, False)),
    ("use_bdlora", (None, False, {})),
    ("velora_config", (None, {})),
    ("monteclora_config", (None, {})),
    ("megatron_config", (None, {})),
)
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass
class PeftLora:
    """One PEFT LoRA folder: ``layers`` maps the module path inside the saved model (the key
    with PEFT's ``base_model.model.`` prefix removed) to ``(A [r, d_in], B [d_out, r])``."""

    name: str
    path: str
    rank: int
    alpha: float
    scaling: float
    target_modules: list[str] | str | None
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def check_peft_lora_config(config: dict[str, Any], where: str) -> None:
    """A ValueError naming the field when ``config`` is not a plain LoRA a mixture computes exactly."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}; only LoRA folders are read")
    for key, allowed in _EXACT_ONLY:
        value = config.get(key)
        if value not in allowed:
            raise ValueError(
                f"{where}: {key}={value!r} is not supported (a LoRA mixture computes plain LoRAs "
                f"exactly; {key} must be one of {[a for a in allowed if a is not None] or [None]})"
            )
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{where}: {key} must be a positive number; got {v!r}")


def read_peft_lora(folder: str | os.PathLike[str], name: str | None = None) -> PeftLora:
    """Read and check one PEFT LoRA folder."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"PEFT LoRA folder {str(path)!r} does not exist or is not a folder")
    config = read_json(path / PEFT_CONFIG)
    check_peft_lora_config(config, str(path / PEFT_CONFIG))
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = read_tensors(weights_file(path, PEFT_SAFE, PEFT_BIN, f"PEFT LoRA folder {path}"))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: weight {key!r} is not a LoRA A or B matrix; only plain LoRAs are read")
        module = m["module"].removeprefix("base_model.model.")
        halves.setdefault(module, {})[m["which"]] = t
    layers = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module {module!r} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"{path}: module {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                "expected [r, d_in] and [d_out, r]"
            )
        if a.shape[0] != r:
            raise ValueError(f"{path}: module {module!r} has rank {a.shape[0]}, the config's r is {r}")
        layers[module] = (a, b)
    if not layers:
        raise ValueError(f"{path}: holds no LoRA weights")
    return PeftLora(name or path.name, str(path), r, alpha, scaling, config.get("target_modules"), layers)
