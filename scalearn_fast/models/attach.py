"""What ``attach_scalearn`` and ``attach_fusion`` share: checking the sources against the model's
FFN sites, freezing the model, and patching every site with a new sub-layer, all or none."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.nn as nn

from .patching import is_patched, patch_site, restore_sites
from .registry import FFNSite


def head_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The task head: parameters outside the base model, plus its pooler (if any)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if base is None or base is model:
        return []
    keep = []
    for name, param in model.named_parameters():
        inside = name.startswith(prefix + ".")
        if not inside or name.startswith(prefix + ".pooler."):
            keep.append((name, param))
    return keep


def check_sources_fit(model: nn.Module, sources: Sequence[Any], sites: Sequence[FFNSite], d: int) -> str:
    """The sources' common non-linearity; raises ``ValueError`` naming the source when they use
    different ones, have another hidden size than the model's ``d`` or cover other layers."""
    activations = {s.activation for s in sources}
    if len(activations) != 1:
        raise ValueError(f"sources use different non-linearities {sorted(activations)}")
    wanted = {s.key for s in sites}
    for src in sources:
        if src.hidden_size != d:
            raise ValueError(f"source {src.name!r} has hidden size {src.hidden_size}, the model has d={d}")
        missing, extra = sorted(wanted - set(src.layers)), sorted(set(src.layers) - wanted)
        if missing or extra:
            raise ValueError(
                f"source {src.name!r} does not fit {type(model).__name__}: "
                f"missing layers {missing}, unknown layers {extra}"
            )
    return activations.pop()


def check_sites_free(sites: Sequence[FFNSite]) -> None:
    """Raise when another attach (ScaLearn or AdapterFusion) already holds the model's sites."""
    taken = [s.name for s in sites if is_patched(s.module)]
    if taken:
        raise RuntimeError(
            f"the model's FFN sites are already patched ({taken[0]}, ...: attach_scalearn or "
            "attach_fusion?); detach first"
        )


def patch_sites(
    model: nn.Module,
    sites: Sequence[FFNSite],
    attr: str,
    build: Callable[[FFNSite], nn.Module],
    *,
    freeze: bool,
) -> dict[str, bool]:
    """Route every site through ``build(site)`` (registered as ``attr``, in the site's train/eval
    mode). With ``freeze`` every model parameter stops requiring grad first; returns the flags
    as they were, for ``restore_sites``. On any error nothing stays patched or frozen."""
    check_sites_free(sites)
    requires_grad: dict[str, bool] = {}
    if freeze:
        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
    try:
        for site in sites:
            layer = build(site)
            layer.train(site.module.training)  # a new module starts in training mode
            patch_site(site, layer, attr)
    except BaseException:
        restore_sites(model, sites, attr, requires_grad)
        raise
    return requires_grad
