"""``save_scalearn`` / ``load_scalearn``: a model's ScaLearn state to and from a checkpoint folder
(the file format is ``scalearn_fast.formats.scalearn``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..formats.adapterhub import SourceSpec, load_adapterhub_sources
from ..formats.keys import site_tag
from ..formats.scalearn import (
    SCALEARN_WEIGHTS,
    embedded_sources,
    read_scalearn_checkpoint,
    write_scalearn_checkpoint,
)
from .attach import head_parameters
from .registry import ffn_sites, hidden_size
from .scalearn import attach_scalearn, attach_state, detach_scalearn, scalearn_layers, shared_omega


def save_scalearn(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    source_paths: Sequence[str | None] | None = None,
    include_sources: bool = False,
    include_head: bool = True,
) -> Path:
    """Save ω (per layer, or the one shared ω of the ++ variants) and the task head of a model
    prepared by ``attach_scalearn`` as ``scalearn.safetensors`` + ``scalearn_config.json``.

    ``source_paths`` (in source order) are recorded so ``load_scalearn`` can find the sources
    again; by default, the folders ``attach_scalearn`` read them from. ``include_sources`` stores
    the frozen source weights too (a self-contained file). The save is atomic: the config
    travels inside the weights file, and a folder left half-written by a killed save is refused
    on load and repaired by the next save.
    """
    state = attach_state(model)
    layers = scalearn_layers(model)
    n = len(state.source_names)
    if source_paths is None:
        paths = list(state.source_paths) if state.source_paths else [None] * n
    elif isinstance(source_paths, str | os.PathLike):
        raise ValueError(f"source_paths is one path {str(source_paths)!r}; pass a list, one per source")
    else:
        paths = [None if p is None else str(p) for p in source_paths]
    if len(paths) != n:
        raise ValueError(f"source_paths has {len(paths)} entries for {n} sources")
    tensors: dict[str, torch.Tensor] = {}
    if state.shared_omega is not None:
        tensors["omega"] = shared_omega(model)
    for site, layer in zip(state.sites, layers, strict=True):
        if state.shared_omega is None:
            tensors[f"omega.{site_tag(site.key)}"] = layer.omega
        if include_sources:
            packed = layer.packed()
            offsets = [0]
            for r in layer.ranks:
                offsets.append(offsets[-1] + r)
            for i in range(layer.num_sources):
                lo, hi = offsets[i], offsets[i + 1]
                tag = f"source.{i}.{site_tag(site.key)}"
                tensors[f"{tag}.w_down"] = packed.w_down[lo:hi]
                tensors[f"{tag}.b_down"] = packed.b_down[lo:hi]
                tensors[f"{tag}.w_up"] = packed.w_up[:, lo:hi]
                tensors[f"{tag}.b_up"] = packed.b_up[i]
    head_names = []
    if include_head:
        for name, param in head_parameters(model):
            tensors[f"head.{name}"] = param
            head_names.append(name)
    first = layers[0]
    config = {
        "variant": state.variant,
        "num_sources": n,
        "source_names": list(state.source_names),
        "source_paths": paths,
        "sources_included": include_sources,
        "hidden_size": hidden_size(model),
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "sites": [list(site.key) for site in state.sites],
        "activation": first.activation,
        "omega_dropout": first.omega_dropout,
        "head": head_names,
    }
    return write_scalearn_checkpoint(directory, config, tensors)


def load_scalearn(
    model: nn.Module,
    directory: str | os.PathLike[str],
    sources: Sequence[SourceSpec] | Mapping[str, SourceSpec] | None = None,
    *,
    backend: str = "auto",
    load_head: bool = True,
) -> nn.Module:
    """Attach ScaLearn to ``model`` from a ``save_scalearn`` folder and load ω (and the head).

    ``sources`` default to the ones stored in the checkpoint, else the recorded folders. A
    checkpoint that does not fit (wrong number of sources, hidden size, source names, layers,
    head, a corrupt file or a half-written folder) raises ``ValueError`` saying which, and
    leaves the model as it was.
    """
    ckpt = read_scalearn_checkpoint(directory)
    config, tensors, folder = ckpt.config, ckpt.tensors, ckpt.folder
    d = hidden_size(model)
    if config["hidden_size"] != d:
        raise ValueError(
            f"{folder}: checkpoint has hidden size d={config['hidden_size']}, the model has d={d}"
        )
    model_sites = [s.key for s in ffn_sites(model)]
    if model_sites != ckpt.sites:
        missing = [site_tag(s) for s in ckpt.sites if s not in model_sites]
        extra = [site_tag(s) for s in model_sites if s not in ckpt.sites]
        raise ValueError(
            f"{folder}: checkpoint has {len(ckpt.sites)} layers, the model has {len(model_sites)} "
            f"(the model lacks {missing}, the checkpoint lacks {extra})"
        )
    names = ckpt.source_names
    if sources is None:
        if config.get("sources_included"):
            srcs = embedded_sources(ckpt)
        else:
            paths = config.get("source_paths") or []
            if not paths or any(p is None for p in paths):
                raise ValueError(f"{folder}: sources are neither stored nor recorded; pass sources=")
            srcs = load_adapterhub_sources(dict(zip(names, paths, strict=True)))
    else:
        srcs = load_adapterhub_sources(sources)
    if len(srcs) != len(names):
        raise ValueError(
            f"{folder}: checkpoint was trained over N={len(names)} sources {names}, got N={len(srcs)}"
        )
    given = [s.name for s in srcs]
    if given != names:
        raise ValueError(
            f"{folder}: checkpoint source names {names} (in order) do not match the given {given}"
        )
    head: list[tuple[str, nn.Parameter]] = []
    if load_head and config.get("head"):
        head = head_parameters(model)
        saved, own = set(config["head"]), {name for name, _ in head}
        if saved != own:
            raise ValueError(
                f"{folder}: the checkpoint's task head {sorted(saved)} does not match the model's "
                f"{sorted(own)}; pass load_head=False to keep the model's head"
            )
    attach_scalearn(model, srcs, config["variant"], backend, omega_dropout=config.get("omega_dropout"))
    try:
        state = attach_state(model)
        with torch.no_grad():
            if state.shared_omega is not None:
                _copy_checked(state.shared_omega, tensors, "omega", folder)
            else:
                for site, layer in zip(state.sites, scalearn_layers(model), strict=True):
                    _copy_checked(layer.omega, tensors, f"omega.{site_tag(site.key)}", folder)
            for name, param in head:
                _copy_checked(param, tensors, f"head.{name}", folder)
    except BaseException:
        detach_scalearn(model)
        raise
    return model


def _copy_checked(dst: torch.Tensor, tensors: Mapping[str, torch.Tensor], key: str, folder: Any) -> None:
    if key not in tensors:
        raise ValueError(f"{folder}: {SCALEARN_WEIGHTS} lacks {key!r}, which its config lists")
    src = tensors[key]
    if src.shape != dst.shape:
        what = "N (sources)" if key.startswith("omega") and src.shape[:1] != dst.shape[:1] else "shape"
        raise ValueError(
            f"{folder}: {key} has shape {list(src.shape)}, expected {list(dst.shape)} (wrong {what})"
        )
    dst.copy_(src.to(dtype=dst.dtype, device=dst.device))
