"""``save_router`` / ``load_router``: a model's routers to and from a checkpoint folder (the file
format is ``scalearn_fast.formats.router``), as ScaLearn checkpoints are saved and loaded."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..formats.adapterhub import SourceSpec, load_adapterhub_sources
from ..formats.keys import site_tag
from ..formats.router import ROUTER_WEIGHTS, read_router_checkpoint, write_router_checkpoint
from ..formats.scalearn import embedded_sources
from .attach import head_parameters
from .registry import ffn_sites, hidden_size
from .router import attach_router, detach_router, router_layers, router_state


def save_router(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    source_paths: Sequence[str | None] | None = None,
    include_sources: bool = False,
    include_head: bool = True,
) -> Path:
    """Save the routers (and the task head) of a model prepared by ``attach_router`` as
    ``router.safetensors`` + ``router_config.json``. ``source_paths`` default to the folders the
    sources were read from; ``include_sources`` stores the frozen sources too. Atomic, as
    ``save_scalearn``."""
    state = router_state(model)
    n = len(state.source_names)
    paths = (
        list(state.source_paths)
        if source_paths is None
        else [None if p is None else str(p) for p in source_paths]
    )
    if len(paths) != n:
        raise ValueError(f"source_paths has {len(paths)} entries for {n} sources")
    tensors: dict[str, torch.Tensor] = {}
    layers = router_layers(model)
    for site, layer in zip(state.sites, layers, strict=True):
        tag = site_tag(site.key)
        tensors[f"router.{tag}.weight"] = layer.router.weight
        tensors[f"router.{tag}.bias"] = layer.router.bias
        if include_sources:
            lo = 0
            for i, r in enumerate(layer.ranks):
                src = f"source.{i}.{tag}"
                tensors[f"{src}.w_down"] = layer.w_down[lo : lo + r]
                tensors[f"{src}.b_down"] = layer.b_down[lo : lo + r]
                tensors[f"{src}.w_up"] = layer.w_up[:, lo : lo + r]
                tensors[f"{src}.b_up"] = layer.b_up[i]
                lo += r
    head_names = []
    if include_head:
        for name, param in head_parameters(model):
            tensors[f"head.{name}"] = param
            head_names.append(name)
    config = {
        **state.config,
        "num_sources": n,
        "source_names": list(state.source_names),
        "source_paths": paths,
        "sources_included": include_sources,
        "hidden_size": hidden_size(model),
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "sites": [list(site.key) for site in state.sites],
        "activation": layers[0].activation,
        "head": head_names,
    }
    return write_router_checkpoint(directory, config, tensors)


def load_router(
    model: nn.Module,
    directory: str | os.PathLike[str],
    sources: Sequence[SourceSpec] | Mapping[str, SourceSpec] | None = None,
    *,
    backend: str = "auto",
    load_head: bool = True,
) -> nn.Module:
    """Attach routers to ``model`` from a ``save_router`` folder and load their weights (and the
    head). ``sources`` default to the stored ones, else the recorded folders. A checkpoint that
    does not fit raises ``ValueError`` saying which, and leaves the model as it was."""
    ckpt = read_router_checkpoint(directory)
    config, folder = ckpt.config, ckpt.folder
    d = hidden_size(model)
    if config["hidden_size"] != d:
        raise ValueError(
            f"{folder}: checkpoint has hidden size d={config['hidden_size']}, the model has d={d}"
        )
    model_sites = [s.key for s in ffn_sites(model)]
    if model_sites != ckpt.sites:
        raise ValueError(
            f"{folder}: checkpoint sites {[site_tag(s) for s in ckpt.sites]} do not match the model's "
            f"{[site_tag(s) for s in model_sites]}"
        )
    names = ckpt.source_names
    if sources is not None:
        srcs = load_adapterhub_sources(sources)
    elif config.get("sources_included"):
        srcs = embedded_sources(ckpt)
    else:
        paths = config.get("source_paths") or []
        if not paths or any(p is None for p in paths):
            raise ValueError(f"{folder}: sources are neither stored nor recorded; pass sources=")
        srcs = load_adapterhub_sources(dict(zip(names, paths, strict=True)))
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
    options = {key: config[key] for key in ("gate", "granularity", "mode")}
    attach_router(model, srcs, k=config.get("k"), backend=backend, **options)
    try:
        with torch.no_grad():
            for site, layer in zip(router_state(model).sites, router_layers(model), strict=True):
                tag = site_tag(site.key)
                _copy(layer.router.weight, ckpt.tensors, f"router.{tag}.weight", folder)
                _copy(layer.router.bias, ckpt.tensors, f"router.{tag}.bias", folder)
            for name, param in head:
                _copy(param, ckpt.tensors, f"head.{name}", folder)
    except BaseException:
        detach_router(model)
        raise
    return model


def _copy(dst: torch.Tensor, tensors: Mapping[str, torch.Tensor], key: str, folder: Any) -> None:
    if key not in tensors:
        raise ValueError(f"{folder}: {ROUTER_WEIGHTS} lacks {key!r}")
    src = tensors[key]
    if src.shape != dst.shape:
        raise ValueError(f"{folder}: {key} has shape {list(src.shape)}, expected {list(dst.shape)}")
    dst.copy_(src.to(dtype=dst.dtype, device=dst.device))
