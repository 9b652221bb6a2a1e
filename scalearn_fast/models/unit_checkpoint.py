"""What ``save_scalearn`` / ``save_router`` and their loaders share: the tensors and config fields
every one-unit checkpoint holds (stored sources, task head, sites, sources), and the checks that
a checkpoint fits a model before anything is attached (the format is
``scalearn_fast.formats.unit``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn as nn

from ..formats.adapterhub import AdapterSource, SourceSpec, load_adapterhub_sources
from ..formats.keys import site_tag
from ..formats.unit import UnitCheckpoint, embedded_sources
from .attach import AttachRecord, head_parameters
from .registry import ffn_sites, hidden_size


class PackedSources(Protocol):
    """The frozen sources of one site, packed along the rank: ``w_down`` [R, d], ``b_down`` [R],
    ``w_up`` [d, R], ``b_up`` [N, d]."""

    w_down: torch.Tensor
    b_down: torch.Tensor
    w_up: torch.Tensor
    b_up: torch.Tensor


def save_parts(
    model: nn.Module,
    state: AttachRecord,
    packed: Sequence[tuple[Sequence[int], Callable[[], PackedSources]]],
    *,
    source_paths: Sequence[str | os.PathLike[str] | None] | None,
    include_sources: bool,
    include_head: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors (stored sources, task head) and config fields every one-unit checkpoint holds.

    ``packed`` gives, per site of ``state``, the sources' ranks and a function returning their
    packed weights (called only with ``include_sources``). ``source_paths`` default to the folders
    the sources were read from.
    """
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
    if include_sources:
        for site, (ranks, weights) in zip(state.sites, packed, strict=True):
            p, lo = weights(), 0
            for i, r in enumerate(ranks):
                tag = f"source.{i}.{site_tag(site.key)}"
                tensors[f"{tag}.w_down"] = p.w_down[lo : lo + r]
                tensors[f"{tag}.b_down"] = p.b_down[lo : lo + r]
                tensors[f"{tag}.w_up"] = p.w_up[:, lo : lo + r]
                tensors[f"{tag}.b_up"] = p.b_up[i]
                lo += r
    head_names = []
    if include_head:
        for name, param in head_parameters(model):
            tensors[f"head.{name}"] = param
            head_names.append(name)
    config = {
        "num_sources": n,
        "source_names": list(state.source_names),
        "source_paths": paths,
        "sources_included": include_sources,
        "hidden_size": hidden_size(model),
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "sites": [list(site.key) for site in state.sites],
        "head": head_names,
    }
    return tensors, config


def check_fit(
    model: nn.Module,
    ckpt: UnitCheckpoint,
    sources: Sequence[SourceSpec] | Mapping[str, SourceSpec] | None,
    load_head: bool,
) -> tuple[list[AdapterSource], list[tuple[str, nn.Parameter]]]:
    """Check that ``ckpt`` fits ``model`` (hidden size, layers, sources, head) before anything is
    attached; return the sources (``sources``, else the stored ones, else the recorded folders)
    and the head parameters to load."""
    config, folder = ckpt.config, ckpt.folder
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
        count = (
            "" if len(srcs) == len(names) else f": trained over N={len(names)} sources but got N={len(srcs)}"
        )
        raise ValueError(
            f"{folder}: checkpoint source names {names} (in order) do not match the given {given}{count}"
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
    return srcs, head


def fill(
    ckpt: UnitCheckpoint,
    targets: Callable[[], Iterable[tuple[torch.Tensor, str]]],
    head: Iterable[tuple[str, nn.Parameter]],
    detach: Callable[[], Any],
) -> None:
    """Copy the checkpoint's tensors into ``targets()`` (each a tensor and its key) and the
    ``head``; on any failure call ``detach`` (undo the attach) and re-raise."""
    try:
        with torch.no_grad():
            for dst, key in targets():
                _copy_checked(dst, ckpt, key)
            for name, param in head:
                _copy_checked(param, ckpt, f"head.{name}")
    except BaseException:
        detach()
        raise


def _copy_checked(dst: torch.Tensor, ckpt: UnitCheckpoint, key: str) -> None:
    if key not in ckpt.tensors:
        raise ValueError(f"{ckpt.folder}: {ckpt.weights_name} lacks {key!r}, which its config lists")
    src = ckpt.tensors[key]
    if src.shape != dst.shape:
        what = "N (sources)" if key.startswith("omega") and src.shape[:1] != dst.shape[:1] else "shape"
        raise ValueError(
            f"{ckpt.folder}: {key} has shape {list(src.shape)}, expected {list(dst.shape)} (wrong {what})"
        )
    dst.copy_(src.to(dtype=dst.dtype, device=dst.device))
