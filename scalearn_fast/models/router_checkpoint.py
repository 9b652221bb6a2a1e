"""``save_router`` / ``load_router``: a model's routers to and from a checkpoint folder (the file
format is ``scalearn_fast.formats.router``), as ScaLearn checkpoints are saved and loaded."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..formats.adapterhub import SourceSpec
from ..formats.keys import site_tag
from ..formats.router import read_router_checkpoint, write_router_checkpoint
from .router import attach_router, detach_router, router_layers, router_state
from .unit_checkpoint import check_fit, fill, save_parts


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
    layers = router_layers(model)
    tensors, config = save_parts(
        model, state, [(layer.ranks, lambda layer=layer: layer) for layer in layers],
        source_paths=source_paths, include_sources=include_sources, include_head=include_head,
    )  # fmt: skip
    for site, layer in zip(state.sites, layers, strict=True):
        tag = site_tag(site.key)
        tensors[f"router.{tag}.weight"] = layer.router.weight
        tensors[f"router.{tag}.bias"] = layer.router.bias
    config = {**state.config, **config, "activation": layers[0].activation}
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
    srcs, head = check_fit(model, ckpt, sources, load_head)
    options = {key: ckpt.config[key] for key in ("gate", "granularity", "mode")}
    attach_router(model, srcs, k=ckpt.config.get("k"), backend=backend, **options)

    def targets() -> Iterator[tuple[torch.Tensor, str]]:
        for site, layer in zip(router_state(model).sites, router_layers(model), strict=True):
            tag = site_tag(site.key)
            yield layer.router.weight, f"router.{tag}.weight"
            yield layer.router.bias, f"router.{tag}.bias"

    fill(ckpt, targets, head, lambda: detach_router(model))
    return model
