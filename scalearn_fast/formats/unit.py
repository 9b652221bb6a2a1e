"""One-unit checkpoint folders: a safetensors weights file whose header holds the config, and a
readable JSON copy of that config written after it.

One atomic ``os.replace`` of the weights file publishes weights and config together; a folder
whose JSON copy differs from the weights' own config (a save killed between the two files, or
files mixed from two checkpoints) is refused. ScaLearn and router checkpoints are both this
shape: a ``UnitFormat`` names the two files and checks the fields of its own kind, on top of the
fields every such checkpoint has (sources, hidden size, sites, activation, head).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..ops.activations import check_activation
from .adapterhub import AdapterSource, check_adapter_weights
from .atomic import atomic_write_json, atomic_write_tensors, clean_stale_temps
from .files import read_json, read_safetensors
from .keys import SiteKey, site_tag

STACKS = ("encoder", "decoder")
_SOURCE_PARAMS = ("w_down", "b_down", "w_up", "b_up")

Fail = Callable[[str], ValueError]


@dataclass
class UnitCheckpoint:
    """A read and checked checkpoint folder (``weights_name`` is its weights file's name)."""

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    weights_name: str = "scalearn.safetensors"

    @property
    def sites(self) -> list[SiteKey]:
        return [(stack, index) for stack, index in self.config["sites"]]

    @property
    def source_names(self) -> list[str]:
        return list(self.config["source_names"])


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_common_fields(config: dict[str, Any], fail: Fail) -> None:
    """Check the fields every one-unit checkpoint has: sources, hidden size, sites, activation,
    head and ``sources_included``; ``fail(message)`` makes the error."""
    n = config["num_sources"]
    if not is_int(n) or n < 1:
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
    if not is_int(d) or d < 1:
        raise fail(f"hidden_size is {d!r}; expected a positive integer")
    sites = config["sites"]
    good = isinstance(sites, list) and sites and all(
        isinstance(s, list | tuple) and len(s) == 2 and s[0] in STACKS and is_int(s[1]) and s[1] >= 0
        for s in sites
    )  # fmt: skip
    if not good:
        raise fail(f"sites is {sites!r:.80}; expected a non-empty list of [stack, layer index] pairs")
    if len({tuple(s) for s in sites}) != len(sites):
        raise fail(f"sites {sites} repeat a site")
    try:
        check_activation(config.get("activation", "relu"))
    except ValueError as exc:
        raise fail(str(exc)) from None
    head = config.get("head", [])
    if not isinstance(head, list) or not all(isinstance(h, str) for h in head):
        raise fail(f"head is {head!r}; expected a list of parameter names")
    if not isinstance(config.get("sources_included", False), bool):
        raise fail(f"sources_included is {config['sources_included']!r}; expected true or false")


@dataclass(frozen=True)
class UnitFormat:
    """One kind of one-unit checkpoint. ``kind`` names its files (``{kind}.safetensors``,
    ``{kind}_config.json``) and the function that saves it (``save_{kind}``, named in errors);
    ``format`` and ``version`` are its format tag and newest version. ``choices`` maps each
    field of its own kind that must be one of a fixed set to that set (the fields it requires);
    ``check_kind`` checks its other fields. ``header_required``: a weights file without the
    config in its header is refused (else it is read from the JSON, as files of older versions
    are)."""

    kind: str
    format: str
    version: int
    choices: Mapping[str, tuple[str, ...]]
    check_kind: Callable[[dict[str, Any], Fail], None]
    header_required: bool = True

    @property
    def config_name(self) -> str:
        return f"{self.kind}_config.json"

    @property
    def weights_name(self) -> str:
        return f"{self.kind}.safetensors"

    @property
    def saved_by(self) -> str:
        return f"save_{self.kind}"

    def check(self, config: Any, where: str | os.PathLike[str]) -> dict[str, Any]:
        """``config`` if it is well-formed, else a ValueError naming ``where`` and the field."""

        def fail(message: str) -> ValueError:
            return ValueError(f"{where}: {message}")

        if not isinstance(config, dict):
            raise fail(f"expected a JSON object, got {type(config).__name__} {config!r:.60}")
        for key in (*self.choices, "num_sources", "source_names", "hidden_size", "sites"):
            if key not in config:
                raise fail(f"missing {key!r}")
        version = config.get("format_version", 1)
        if not is_int(version) or version > self.version:
            raise fail(f"format_version {version!r}: this scalearn_fast reads versions up to {self.version}")
        check_common_fields(config, fail)
        for key, allowed in self.choices.items():
            if config[key] not in allowed:
                raise fail(f"{key} {config[key]!r} is not one of {allowed}")
        self.check_kind(config, fail)
        return config

    def write(
        self, directory: str | os.PathLike[str], config: dict[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> Path:
        """Write a checked ``config`` and its ``tensors``: weights (with the config in the header)
        first, then the JSON copy. Stale temporary files of killed saves are removed first."""
        folder = Path(directory)
        config = dict(config, format=self.format, format_version=self.version)
        self.check(config, folder / self.config_name)
        config = json.loads(json.dumps(config))  # what a reader will compare: plain JSON types
        clean_stale_temps(folder, (self.config_name, self.weights_name))
        metadata = {"format": self.format, "format_version": str(self.version), "config": json.dumps(config)}
        atomic_write_tensors(folder / self.weights_name, tensors, metadata=metadata)
        atomic_write_json(folder / self.config_name, config)
        return folder

    def read_config(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """The checked JSON config of a checkpoint folder."""
        path = Path(directory) / self.config_name
        if not path.is_file():
            raise ValueError(f"{directory}: no {self.config_name} (not a {self.saved_by} folder)")
        return self.check(read_json(path, object_required=False), path)

    def read(self, directory: str | os.PathLike[str]) -> UnitCheckpoint:
        """Read, check and pair the two files of a checkpoint folder."""
        folder = Path(directory)
        clean_stale_temps(folder, (self.config_name, self.weights_name))
        config = self.read_config(folder)
        weights = folder / self.weights_name
        if not weights.is_file():
            raise ValueError(f"{folder}: no {self.weights_name}")
        tensors, metadata = read_safetensors(weights)
        if "config" in metadata or self.header_required:
            try:
                own = json.loads(metadata.get("config", "null"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{weights}: corrupt config in the file header ({exc})") from exc
            self.check(own, f"{weights} (header)")
            if own != config:
                config = self.read_config(folder)  # a save may have finished meanwhile: look again
            if own != config:
                changed = sorted(k for k in own.keys() | config.keys() if own.get(k) != config.get(k))
                raise ValueError(
                    f"{folder}: {self.config_name} does not match the config stored in {self.weights_name} "
                    f"(fields {changed} differ): the two files come from different saves (a save was "
                    "interrupted, or files were mixed); save the model again"
                )
        return UnitCheckpoint(folder, config, tensors, self.weights_name)


def embedded_sources(checkpoint: UnitCheckpoint) -> list[AdapterSource]:
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
                    f"{checkpoint.weights_name} lacks {missing}"
                )
            layers[site] = check_adapter_weights(
                [tensors[f"{tag}.{p}"] for p in _SOURCE_PARAMS],
                f"{checkpoint.folder}: stored source {i} ({name!r}) at {site_tag(site)}",
                hidden_size=d,
            )
        sources.append(AdapterSource(name, layers, activation))
    return sources
