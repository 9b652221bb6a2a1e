"""Router checkpoints: the file format of a ``save_router`` folder, with no model in sight.

A folder holds ``router.safetensors`` (each site's router as ``router.{stack}.{index}.weight``
[N, d] and ``.bias`` [N]; the task head as ``head.{name}``; with ``sources_included`` the frozen
sources as ``source.{i}.{stack}.{index}.{w_down|b_down|w_up|b_up}``, as in ScaLearn
checkpoints) and ``router_config.json``. As for ScaLearn checkpoints, the weights file's header
holds the config too (one atomic replace publishes both), and a folder whose JSON copy differs
from it is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..ops.activations import check_activation
from .atomic import atomic_write_json, atomic_write_tensors, clean_stale_temps
from .files import read_json, read_safetensors
from .scalearn import STACKS, ScaLearnCheckpoint

ROUTER_CONFIG = "router_config.json"
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_FORMAT = "scalearn_fast_router"
ROUTER_FORMAT_VERSION = 1
_GATES = ("softmax", "sigmoid", "topk")
_GRANULARITIES = ("token", "sequence")
_MODES = ("output", "merge")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_router_config(config: Any, where: str | os.PathLike[str]) -> dict[str, Any]:
    """``config`` if it is a well-formed router checkpoint config, else a ValueError naming
    ``where`` and the field."""

    def fail(message: str) -> ValueError:
        return ValueError(f"{where}: {message}")

    if not isinstance(config, dict):
        raise fail(f"expected a JSON object, got {type(config).__name__} {config!r:.60}")
    for key in ("gate", "granularity", "mode", "num_sources", "source_names", "hidden_size", "sites"):
        if key not in config:
            raise fail(f"missing {key!r}")
    version = config.get("format_version", ROUTER_FORMAT_VERSION)
    if not _is_int(version) or version > ROUTER_FORMAT_VERSION:
        raise fail(
            f"format_version {version!r}: this scalearn_fast reads versions up to {ROUTER_FORMAT_VERSION}"
        )
    for key, allowed in (("gate", _GATES), ("granularity", _GRANULARITIES), ("mode", _MODES)):
        if config[key] not in allowed:
            raise fail(f"{key} {config[key]!r} is not one of {allowed}")
    n, k = config["num_sources"], config.get("k")
    if not _is_int(n) or n < 1:
        raise fail(f"num_sources is {n!r}; expected a positive integer")
    if (config["gate"] == "topk") != (k is not None) or (k is not None and not (_is_int(k) and 1 <= k <= n)):
        raise fail(f"k is {k!r} for gate {config['gate']!r} and N={n} (topk needs 1 <= k <= N, others null)")
    names = config["source_names"]
    if not isinstance(names, list) or not all(isinstance(s, str) for s in names) or len(set(names)) != n:
        raise fail(f"source_names is {names!r}; expected {n} distinct strings")
    paths = config.get("source_paths")
    if paths is not None and (
        not isinstance(paths, list)
        or len(paths) != n
        or not all(p is None or isinstance(p, str) for p in paths)
    ):
        raise fail(f"source_paths is {paths!r}; expected a list of {n} folder names (or nulls)")
    d = config["hidden_size"]
    if not _is_int(d) or d < 1:
        raise fail(f"hidden_size is {d!r}; expected a positive integer")
    sites = config["sites"]
    good = isinstance(sites, list) and sites and all(
        isinstance(s, list | tuple) and len(s) == 2 and s[0] in STACKS and _is_int(s[1]) and s[1] >= 0
        for s in sites
    )  # fmt: skip
    if not good or len({tuple(s) for s in sites}) != len(sites):
        raise fail(f"sites is {sites!r:.80}; expected distinct [stack, layer index] pairs")
    try:
        check_activation(config.get("activation", "relu"))
    except ValueError as exc:
        raise fail(str(exc)) from None
    head = config.get("head", [])
    if not isinstance(head, list) or not all(isinstance(h, str) for h in head):
        raise fail(f"head is {head!r}; expected a list of parameter names")
    if not isinstance(config.get("sources_included", False), bool):
        raise fail(f"sources_included is {config['sources_included']!r}; expected true or false")
    return config


def write_router_checkpoint(
    directory: str | os.PathLike[str], config: dict[str, Any], tensors: Mapping[str, torch.Tensor]
) -> Path:
    """Write a checked ``config`` and its ``tensors``: weights (config in the header) first,
    then the JSON copy."""
    folder = Path(directory)
    config = dict(config, format=ROUTER_FORMAT, format_version=ROUTER_FORMAT_VERSION)
    check_router_config(config, folder / ROUTER_CONFIG)
    config = json.loads(json.dumps(config))
    clean_stale_temps(folder, (ROUTER_CONFIG, ROUTER_WEIGHTS))
    metadata = {
        "format": ROUTER_FORMAT,
        "format_version": str(ROUTER_FORMAT_VERSION),
        "config": json.dumps(config),
    }
    atomic_write_tensors(folder / ROUTER_WEIGHTS, tensors, metadata=metadata)
    atomic_write_json(folder / ROUTER_CONFIG, config)
    return folder


def read_router_checkpoint(directory: str | os.PathLike[str]) -> ScaLearnCheckpoint:
    """Read, check and pair the two files of a ``save_router`` folder (returned in the
    ``ScaLearnCheckpoint`` shape, so ``embedded_sources`` reads its stored sources)."""
    folder = Path(directory)
    clean_stale_temps(folder, (ROUTER_CONFIG, ROUTER_WEIGHTS))
    path, weights = folder / ROUTER_CONFIG, folder / ROUTER_WEIGHTS
    if not path.is_file():
        raise ValueError(f"{directory}: no {ROUTER_CONFIG} (not a save_router folder)")
    if not weights.is_file():
        raise ValueError(f"{folder}: no {ROUTER_WEIGHTS}")
    config = check_router_config(read_json(path, object_required=False), path)
    tensors, metadata = read_safetensors(weights)
    try:
        own = json.loads(metadata.get("config", "null"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{weights}: corrupt config in the file header ({exc})") from exc
    check_router_config(own, f"{weights} (header)")
    if own != config:
        changed = sorted(k for k in own.keys() | config.keys() if own.get(k) != config.get(k))
        raise ValueError(
            f"{folder}: {ROUTER_CONFIG} does not match the config stored in {ROUTER_WEIGHTS} (fields "
            f"{changed} differ): the two files come from different saves; save the model again"
        )
    return ScaLearnCheckpoint(folder, config, tensors)
