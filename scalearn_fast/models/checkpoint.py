"""``save_scalearn`` / ``load_scalearn``: a model's ScaLearn state to and from a checkpoint folder
(the file format is ``scalearn_fast.formats.scalearn``)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..formats.adapterhub import SourceSpec
from ..formats.keys import site_tag
from ..formats.official import is_official_folder, read_official_checkpoint
from ..formats.scalearn import SCALEARN_WEIGHTS, read_scalearn_checkpoint, write_scalearn_checkpoint
from ..formats.unit import UnitCheckpoint
from .registry import ffn_sites
from .scalearn import attach_scalearn, attach_state, detach_scalearn, scalearn_layers, shared_omega
from .unit_checkpoint import check_fit, fill, save_parts


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
    tensors, config = save_parts(
        model, state, [(layer.ranks, layer.packed) for layer in layers],
        source_paths=source_paths, include_sources=include_sources, include_head=include_head,
    )  # fmt: skip
    if state.shared_omega is not None:
        tensors["omega"] = shared_omega(model)
    else:
        for site, layer in zip(state.sites, layers, strict=True):
            tensors[f"omega.{site_tag(site.key)}"] = layer.omega
    first = layers[0]
    config.update(variant=state.variant, activation=first.activation, omega_dropout=first.omega_dropout)
    return write_scalearn_checkpoint(directory, config, tensors)


def load_scalearn(
    model: nn.Module,
    directory: str | os.PathLike[str],
    sources: Sequence[SourceSpec] | Mapping[str, SourceSpec] | None = None,
    *,
    backend: str = "auto",
    load_head: bool = True,
    omega: torch.Tensor | None = None,
) -> nn.Module:
    """Attach ScaLearn to ``model`` from a ``save_scalearn`` folder and load ω (and the head).

    ``sources`` default to the ones stored in the checkpoint, else the recorded folders. A
    checkpoint that does not fit (wrong number of sources, hidden size, source names, layers,
    head, a corrupt file or a half-written folder) raises ``ValueError`` saying which, and
    leaves the model as it was.

    A folder written by the official ScaLearn code (``scalearn_config.json`` +
    ``pytorch_model_scalearn.bin``) loads too; it records neither source folders nor a head, so
    pass ``sources`` (``{name: AdapterHub folder}`` or a list in its order). Its ``++`` folders
    hold no ω (the official saver misses the shared one): they are refused unless ``omega`` (the
    trained shared ω, ``[N, d]`` or ``[N, 1]``) is passed; ``omega`` is for those folders only.
    """
    ckpt = read_checkpoint(directory, model, omega=omega)
    if ckpt.weights_name != SCALEARN_WEIGHTS and sources is None:
        raise ValueError(
            f"{directory}: a folder of the official ScaLearn code records no source folders; pass "
            f"sources= ({{name: AdapterHub folder}} for {ckpt.source_names}, in that order)"
        )
    srcs, head = check_fit(model, ckpt, sources, load_head)
    config = ckpt.config
    attach_scalearn(model, srcs, config["variant"], backend, omega_dropout=config.get("omega_dropout"))

    def targets() -> Iterator[tuple[torch.Tensor, str]]:
        state = attach_state(model)
        if state.shared_omega is not None:
            yield state.shared_omega, "omega"
        else:
            for site, layer in zip(state.sites, scalearn_layers(model), strict=True):
                yield layer.omega, f"omega.{site_tag(site.key)}"

    fill(ckpt, targets, head, lambda: detach_scalearn(model))
    return model


def read_checkpoint(
    directory: str | os.PathLike[str], model: nn.Module | None = None, *, omega: torch.Tensor | None = None
) -> UnitCheckpoint:
    """A ``save_scalearn`` folder, or one of the official ScaLearn code (read as the same
    ``UnitCheckpoint``; ``model`` gives a ``++`` folder its sites)."""
    if is_official_folder(directory) and not (Path(directory) / SCALEARN_WEIGHTS).is_file():
        sites = None if model is None else [s.key for s in ffn_sites(model)]
        return read_official_checkpoint(directory, omega=omega, sites=sites)
    if omega is not None:
        raise ValueError(
            f"{directory}: omega= is only for ++ folders of the official ScaLearn code, which hold no ω; "
            "a save_scalearn folder has its own"
        )
    return read_scalearn_checkpoint(directory)
