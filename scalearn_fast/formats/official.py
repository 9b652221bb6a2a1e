"""ScaLearn folders written by the official ScaLearn code (its fork of adapter-transformers).

Its ``model.save_scalearn(dir, name)`` writes two files:

- ``scalearn_config.json``: ``{"name": "rte,mrpc,...", "config": {...}, "hidden_size",
  "model_type", "model_class", "model_name", "version"}``. ``name`` lists the sources, in the
  order ω's rows follow; ``config`` is the ScaLearn config (``learn_omega``, ``omega_shape``
  ``"vector"``/``"scalar"``, ``per_layer`` (True: one ω shared by every layer, the ``++``
  variants), ``dropout_ratio``, ``residual``, ``take_mean``, ``take_softmax``, ...).
- ``pytorch_model_scalearn.bin``: a ``torch.save`` pickle of the model's state-dict entries whose
  key contains ``scalearn_layer.``: per layer ``[prefix.]encoder.layer.{l}.output.scalearn_layer.
  {name}.omega``, shape ``[N, d]`` (``vector``) or ``[N, 1]`` (``scalar``).

For the ``++`` variants the shared ω lives at ``[prefix.]shared_parameters.{name}.omega``, which
that filter misses: the official saver writes a file without ω, and its loader restores none.
Such a folder is refused unless the caller passes ω; it is never made up. A file that does hold
the shared ω (a saver fixed by its user) is read.

``read_official_checkpoint`` turns a folder into the same ``UnitCheckpoint`` a ``save_scalearn``
folder reads as, so loading and converting share the rest of the code. The ``.bin`` is read
with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .files import read_json, read_tensors
from .keys import SiteKey, site_tag
from .unit import UnitCheckpoint

OFFICIAL_CONFIG = "scalearn_config.json"
OFFICIAL_WEIGHTS = "pytorch_model_scalearn.bin"

_LAYER_OMEGA = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.output\.scalearn_layer\.(.+)\.omega$")
_SHARED_OMEGA = re.compile(r"(?:^|\.)shared_parameters\.(.+)\.omega$")
_ABLATIONS = ("take_mean", "take_softmax")  # ω rescaled before use: not the composition computed here


def is_official_folder(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds the official code's ScaLearn weights file."""
    return (Path(directory) / OFFICIAL_WEIGHTS).is_file()


def official_variant(config: dict[str, Any], where: str) -> str:
    """Our variant name for an official ScaLearn ``config``; a ValueError naming the field for a
    config whose composition this package does not compute."""
    if not config.get("learn_omega", False):
        raise ValueError(
            f"{where}: learn_omega is false (the official code's fixed-ω probing grid), not a trained "
            "ScaLearn; only learned ω can be loaded"
        )
    for flag in _ABLATIONS:
        if config.get(flag):
            raise ValueError(
                f"{where}: {flag}=true (an ablation that rescales ω before use); only plain ScaLearn "
                "(take_mean and take_softmax false) is supported"
            )
    if config.get("residual", True) is not True:
        raise ValueError(f"{where}: residual={config.get('residual')!r}; only residual=true is supported")
    shape = config.get("omega_shape")
    if shape not in ("vector", "scalar"):
        raise ValueError(f"{where}: omega_shape is {shape!r}; expected 'vector' or 'scalar'")
    variant = "scalearn" if shape == "vector" else "scalearn_uniform"
    return variant + "++" if config.get("per_layer") else variant


def _check_omega(omega: Any, n: int, cols: int, what: str, where: str) -> torch.Tensor:
    if not isinstance(omega, torch.Tensor):
        raise ValueError(f"{where}: {what} is a {type(omega).__name__}; expected a tensor [{n}, {cols}]")
    if tuple(omega.shape) != (n, cols) or not omega.is_floating_point():
        raise ValueError(
            f"{where}: {what} has shape {list(omega.shape)} ({omega.dtype}); expected [{n}, {cols}] "
            f"(N={n} sources, {'d' if cols != 1 else '1'}={cols}) floating point"
        )
    return omega.detach().to("cpu", copy=True)


def read_official_checkpoint(
    directory: str | os.PathLike[str],
    *,
    omega: torch.Tensor | None = None,
    sites: Sequence[SiteKey] | None = None,
) -> UnitCheckpoint:
    """A folder written by the official code's ``save_scalearn``, as a ``UnitCheckpoint`` with
    our config fields (no source folders recorded, no head).

    ``omega``: the one shared ω ``[N, d]`` (``[N, 1]`` for ScaLearnUniform++) of a ``++`` folder,
    whose official file holds none; refused for the other variants, whose file has ω per layer.
    ``sites``: the model's ``(stack, layer index)`` sites, needed with ``omega`` (the file does
    not say how many layers there are); checked against the file's layers otherwise.
    """
    folder = Path(directory)
    config_file, weights = folder / OFFICIAL_CONFIG, folder / OFFICIAL_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{folder}: no {OFFICIAL_WEIGHTS} (not a folder of the official ScaLearn code)")
    meta = read_json(config_file)
    name, config, d = meta.get("name"), meta.get("config"), meta.get("hidden_size")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{config_file}: 'name' is {name!r}; expected the sources joined by commas")
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: 'config' is {config!r:.60}; expected the ScaLearn config object")
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise ValueError(f"{config_file}: 'hidden_size' is {d!r}; expected a positive integer")
    names = name.split(",")
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"{config_file}: 'name' {name!r} does not list distinct source names")
    variant = official_variant(config, str(config_file))
    n, cols = len(names), (d if variant in ("scalearn", "scalearn++") else 1)
    dropout = config.get("dropout_ratio", 0.0)
    if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{config_file}: dropout_ratio is {dropout!r}; expected a number in [0, 1)")

    state = read_tensors(weights)  # weights_only: plain tensors, no pickled objects
    per_layer: dict[int, torch.Tensor] = {}
    shared: torch.Tensor | None = None
    for key, tensor in state.items():
        if (m := _LAYER_OMEGA.search(key)) is not None and ".attention." not in key:
            where, owner = f"{weights}: {key}", m.group(2)
            if owner != name:
                raise ValueError(f"{where} belongs to ScaLearn {owner!r}, the config names {name!r}")
            per_layer[int(m.group(1))] = _check_omega(tensor, n, cols, "omega", where)
        elif (m := _SHARED_OMEGA.search(key)) is not None and m.group(1) == name:
            shared = _check_omega(tensor, n, cols, "the shared omega", f"{weights}: {key}")
        else:
            raise ValueError(
                f"{weights}: unexpected key {key!r}; the official saver writes only "
                "encoder.layer.{l}.output.scalearn_layer.{name}.omega (FFN-output ScaLearn of an encoder)"
            )

    shared_variant = variant.endswith("++")
    if not shared_variant:
        if omega is not None:
            raise ValueError(
                f"{folder}: omega= is only for ++ folders, whose official file holds no ω; this "
                f"{variant} folder stores ω per layer"
            )
        if per_layer and shared is None:
            layers = sorted(per_layer)
            if layers != list(range(len(layers))):
                raise ValueError(f"{weights}: ω for layers {layers}; expected layers 0..{len(layers) - 1}")
            file_sites = [("encoder", i) for i in layers]
            if sites is not None and list(sites) != file_sites:
                raise ValueError(
                    f"{folder}: the file has ω for {len(file_sites)} layers, the model has {len(sites)} sites"
                )
            tensors = {f"omega.{site_tag(s)}": per_layer[s[1]] for s in file_sites}
        else:
            raise ValueError(f"{weights}: holds no per-layer ω (keys ...scalearn_layer.{name}.omega)")
    else:
        if per_layer:
            raise ValueError(f"{weights}: per-layer ω in a {variant} folder (per_layer=true shares one ω)")
        if shared is None and omega is None:
            raise ValueError(
                f"{folder}: a {variant} folder of the official ScaLearn code holds no ω: its saver keeps "
                "only keys with 'scalearn_layer.', and the shared ω lives under "
                f"'shared_parameters.{name}.omega', so it was never written (its own loader restores "
                "none either). Pass the trained ω yourself (omega=, a tensor of shape "
                f"[{n}, {cols}]; CLI: --omega FILE) if you have it; it is not made up here"
            )
        if shared is not None and omega is not None:
            raise ValueError(f"{weights}: holds the shared ω already; do not pass omega=")
        if shared is None:
            shared = _check_omega(omega, n, cols, "omega", str(folder))
        if not sites:
            raise ValueError(
                f"{folder}: a {variant} folder does not say how many layers its model has; pass the sites"
            )
        file_sites = list(sites)
        tensors = {"omega": shared}

    ours = {
        "variant": variant,
        "num_sources": n,
        "source_names": names,
        "source_paths": [None] * n,
        "sources_included": False,
        "hidden_size": d,
        "model_type": meta.get("model_type"),
        "sites": [list(s) for s in file_sites],
        "head": [],
        "activation": "relu",
        "omega_dropout": float(dropout),
        "converted_from": "official ScaLearn code",
    }
    return UnitCheckpoint(folder, ours, tensors, OFFICIAL_WEIGHTS)
