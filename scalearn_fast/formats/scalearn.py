"""ScaLearn checkpoints: the file format of a ``save_scalearn`` folder, with no model in sight.

A folder holds ``scalearn.safetensors`` (ω per site as ``omega.{stack}.{index}`` or the one
shared ``omega``; the task head as ``head.{name}``; with ``sources_included`` the frozen sources
as ``source.{i}.{stack}.{index}.{w_down|b_down|w_up|b_up}``) and ``scalearn_config.json``.

The weights file is the unit of truth: its header metadata holds the config too, so one atomic
``os.replace`` publishes weights and config together. ``scalearn_config.json`` is a readable copy
written after it; a folder whose copy differs from the weights' own config (a save killed
between the two files, or files mixed from two checkpoints) is refused. Files written before the
config moved into the header (``format_version`` 1) have no such copy and load from the JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..layers import VARIANTS
from ..ops.activations import check_activation
from .adapterhub import AdapterSource, check_adapter_weights
from .atomic import atomic_write_json, atomic_write_tensors, clean_stale_temps
from .files import read_json, read_safetensors
from .keys import SiteKey, site_tag

SCALEARN_CONFIG = "scalearn_config.json"
SCALEARN_WEIGHTS = "scalearn.safetensors"
FORMAT = "scalearn_fast"
FORMAT_VERSION = 2
STACKS = ("encoder", "decoder")
_SOURCE_PARAMS = ("w_down", "b_down", "w_up", "b_up")


@dataclass
class ScaLearnCheckpoint:
    """A read and checked ``save_scalearn`` folder."""

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def sites(self) -> list[SiteKey]:
        return [(stack, index) for stack, index in self.config["sites"]]

    @property
    def source_names(self) -> list[str]:
        return list(self.config["source_names"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_scalearn_config(config: Any, where: str | os.PathLike[str]) -> dict[str, Any]:
    """``config`` if it is a well-formed ScaLearn checkpoint config, else a ValueError naming
    ``where`` and the field."""

    def fail(message: str) -> ValueError:
        return ValueError(f"{where}: {message}")

    if not isinstance(config, dict):
        raise fail(f"expected a JSON object, got {type(config).__name__} {config!r:.60}")
    for key in ("variant", "num_sources", "source_names", "hidden_size", "sites"):
        if key not in config:
            raise fail(f"missing {key!r}")
    version = config.get("format_version", 1)
    if not _is_int(version) or version > FORMAT_VERSION:
        raise fail(f"format_version {version!r}: this scalearn_fast reads versions up to {FORMAT_VERSION}")
    if config["variant"] not in VARIANTS:
        raise fail(f"variant {config['variant']!r} is not one of {VARIANTS}")
    n = config["num_sources"]
    if not _is_int(n) or n < 1:
        raise fail(f"num_sources is {n!r}; expected a positive integer")
    names = config["source_names"]
    if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
        raise fail(f"source_names is {names!r}; expected a list of strings")
    if len(names) != n:
        raise fail(f"num_sources={n} but {len(names)} names")
    if len(set(names)) != n:
        raise fail(f"source_names {names} are not unique")
    paths = config.get("source_paths")
    if paths is not None:
        if not isinstance(paths, list) or not all(p is None or isinstance(p, str) for p in paths):
            raise fail(f"source_paths is {paths!r}; expected a list of folder names (or nulls)")
        if len(paths) != n:
            raise fail(f"source_paths has {len(paths)} entries for {n} sources")
    d = config["hidden_size"]
    if not _is_int(d) or d < 1:
        raise fail(f"hidden_size is {d!r}; expected a positive integer")
    sites = config["sites"]
    good = (
        isinstance(sites, list)
        and sites
        and all(
            isinstance(s, list | tuple) and len(s) == 2 and s[0] in STACKS and _is_int(s[1]) and s[1] >= 0
            for s in sites
        )
    )
    if not good:
        raise fail(f"sites is {sites!r:.80}; expected a non-empty list of [stack, layer index] pairs")
    if len({tuple(s) for s in sites}) != len(sites):
        raise fail(f"sites {sites} repeat a site")
    try:
        check_activation(config.get("activation", "relu"))
    except ValueError as exc:
        raise fail(str(exc)) from None
    dropout = config.get("omega_dropout")
    if dropout is not None and (not isinstance(dropout, int | float) or isinstance(dropout, bool)
                                or not 0.0 <= dropout < 1.0):  # fmt: skip
        raise fail(f"omega_dropout is {dropout!r}; expected null or a number in [0, 1)")
    head = config.get("head", [])
    if not isinstance(head, list) or not all(isinstance(h, str) for h in head):
        raise fail(f"head is {head!r}; expected a list of parameter names")
    if not isinstance(config.get("sources_included", False), bool):
        raise fail(f"sources_included is {config['sources_included']!r}; expected true or false")
    return config


def write_scalearn_checkpoint(
    directory: str | os.PathLike[str], config: dict[str, Any], tensors: Mapping[str, torch.Tensor]
) -> Path:
    """Write a checked ``config`` and its ``tensors``: weights (with the config in the header)
    first, then the JSON copy. Stale temporary files of killed saves are removed first."""
    folder = Path(directory)
    config = dict(config, format=FORMAT, format_version=FORMAT_VERSION)
    check_scalearn_config(config, folder / SCALEARN_CONFIG)
    config = json.loads(json.dumps(config))  # what a reader will compare: plain JSON types
    clean_stale_temps(folder, (SCALEARN_CONFIG, SCALEARN_WEIGHTS))
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(config)}
    atomic_write_tensors(folder / SCALEARN_WEIGHTS, tensors, metadata=metadata)
    atomic_write_json(folder / SCALEARN_CONFIG, config)
    return folder


def read_scalearn_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``scalearn_config.json`` of a ``save_scalearn`` folder."""
    path = Path(directory) / SCALEARN_CONFIG
    if not path.is_file():
        raise ValueError(f"{directory}: no {SCALEARN_CONFIG} (not a save_scalearn folder)")
    return check_scalearn_config(read_json(path, object_required=False), path)


def read_scalearn_checkpoint(directory: str | os.PathLike[str]) -> ScaLearnCheckpoint:
    """Read, check and pair the two files of a ``save_scalearn`` folder."""
    folder = Path(directory)
    clean_stale_temps(folder, (SCALEARN_CONFIG, SCALEARN_WEIGHTS))
    config = read_scalearn_config(folder)
    weights = folder / SCALEARN_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{folder}: no {SCALEARN_WEIGHTS}")
    tensors, metadata = read_safetensors(weights)
    if "config" in metadata:
        try:
            own = json.loads(metadata["config"])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{weights}: corrupt config in the file header ({exc})") from exc
        check_scalearn_config(own, f"{weights} (header)")
        if own != config:
            config = read_scalearn_config(folder)  # a save may have finished meanwhile: look again
        if own != config:
            changed = sorted(k for k in own.keys() | config.keys() if own.get(k) != config.get(k))
            raise ValueError(
                f"{folder}: {SCALEARN_CONFIG} does not match the config stored in {SCALEARN_WEIGHTS} "
                f"(fields {changed} differ): the two files come from different saves (a save was "
                "interrupted, or files were mixed); save the model again"
            )
    return ScaLearnCheckpoint(folder, config, tensors)


def embedded_sources(checkpoint: ScaLearnCheckpoint) -> list[AdapterSource]:
    """The frozen sources stored in a checkpoint saved with ``include_sources=True``."""
    config, tensors = checkpoint.config, checkpoint.tensors
    d = config["hidden_size"]
    activation = config.get("activation", "relu")
    sources = []
    for i, name in enumerate(config["source_names"]):
        layers = {}
        for site in checkpoint.sites:
            tag = f"source.{i}.{site_tag(site)}"
            missing = [f"{tag}.{p}" for p in _SOURCE_PARAMS if f"{tag}.{p}" not in tensors]
            if missing:
                raise ValueError(
                    f"{checkpoint.folder}: the config says sources are included but "
                    f"{SCALEARN_WEIGHTS} lacks {missing}"
                )
            layers[site] = check_adapter_weights(
                [tensors[f"{tag}.{p}"] for p in _SOURCE_PARAMS],
                f"{checkpoint.folder}: stored source {i} ({name!r}) at {site_tag(site)}",
                hidden_size=d,
            )
        sources.append(AdapterSource(name, layers, activation))
    return sources
