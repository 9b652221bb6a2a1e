"""``attach_router`` / ``detach_router``: router-weighted composition of frozen adapters (L2R)
inside a transformers model, per instance.

Sequence routers need the attention mask at every patched site, which the sites' own forward
does not receive. ``attach_router`` registers a forward pre-hook on the model
(``AttentionMaskHook``) that stores the call's ``attention_mask`` (keyword, or the second
positional argument as in ``model(input_ids, attention_mask)``) and ``decoder_attention_mask``
in a ``RoutingContext`` shared by the model's ``RouterLayer``s: encoder sites pool over the
first, decoder sites over the second (every decoder token when it is absent).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..formats.adapterhub import load_adapterhub_sources
from ..layers_router import RouterLayer, RoutingContext, check_router_options
from .attach import (
    ROUTER,
    AttachKind,
    AttachRecord,
    attach,
    detach,
    site_layer,
)
from .registry import FFNSite


class AttentionMaskHook:
    """Forward pre-hook (``with_kwargs=True``) of a model with sequence routers: puts the call's
    attention masks into the routers' ``RoutingContext``."""

    def __init__(self, context: RoutingContext) -> None:
        self.context = context

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        self.context.masks = {"encoder": mask, "decoder": kwargs.get("decoder_attention_mask")}


_KIND: AttachKind[RouterLayer] = AttachKind(ROUTER)
router_state = _KIND.record  # the attach record; the router's options are in its ``config``
has_router = _KIND.attached
router_layers = _KIND.layers


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable routers' parameters, in site order (weight, bias per site)."""
    return [p for layer in router_layers(model) for p in layer.router.parameters()]


def attach_router(
    model: nn.Module,
    sources: Sequence[Any] | Mapping[str, Any] | str | os.PathLike[str],
    *,
    gate: str = "softmax",
    k: int | None = None,
    granularity: str = "token",
    mode: str = "output",
    backend: str = "auto",
    freeze: bool = True,
) -> nn.Module:
    """Inject N frozen source adapters, composed by a trainable router per layer, after every FFN
    output sub-layer of ``model`` (docs/routing.md).

    ``sources`` are as for ``attach_scalearn`` (AdapterHub folders, ``{name: folder}``, or
    in-memory weights). ``gate``: ``softmax``, ``sigmoid`` or ``topk`` (with ``k``).
    ``granularity``: ``token`` or ``sequence`` (mean over real tokens; the mask comes from the
    model's ``attention_mask`` argument). ``mode``: ``output`` weights the adapters' outputs,
    ``merge`` their parameters (equal ranks required). With ``freeze`` (default) only the
    routers and the task head train. Returns ``model``, patched in place; undo with
    ``detach_router``, save with ``save_router``.
    """
    srcs = load_adapterhub_sources(sources)
    sites, d, activation = _KIND.fit_sources(model, srcs)
    k = check_router_options(gate, k, granularity, mode, len(srcs))
    if mode == "merge":
        for site in sites:
            ranks = {s.name: s.layers[site.key][0].shape[0] for s in srcs}
            if len(set(ranks.values())) != 1:
                raise ValueError(
                    f"merge mode needs sources of equal rank; at {site.name} the ranks are {ranks}"
                )
    param = next(model.parameters())
    context = RoutingContext()

    def build(site: FFNSite) -> RouterLayer:
        return site_layer(
            RouterLayer, srcs, site, activation=activation, backend=backend, like=param,
            gate=gate, k=k, granularity=granularity, mode=mode, context=context, stack=site.stack,
        )  # fmt: skip

    config = {"gate": gate, "k": k, "granularity": granularity, "mode": mode}
    record = AttachRecord.over(ROUTER, srcs, sites, backend, config=config)
    attach(model, record, build, lambda: router_parameters(model), freeze=freeze)
    if granularity == "sequence":
        record.handles.append(model.register_forward_pre_hook(AttentionMaskHook(context), with_kwargs=True))
    return model


def detach_router(model: nn.Module) -> nn.Module:
    """Undo ``attach_router``: original forwards, hooks and ``requires_grad`` flags come back."""
    detach(model, ROUTER)
    for key, hook in list(model._forward_pre_hooks.items()):  # by type: a copied model has its own
        if isinstance(hook, AttentionMaskHook):
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    return model
