"""What ``attach_scalearn`` and ``attach_fusion`` share: the attach record and its getters,
checking the sources against the model's FFN sites, freezing the model, patching every site with
a new sub-layer (all or none), gradient checkpointing, and detach."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.nn as nn

from ..formats.adapterhub import SOURCE_LAYOUTS
from .patching import LayerNormRef, is_patched, patch_site, restore_sites
from .registry import FFNSite, ffn_sites, hidden_size

SCALEARN = "scalearn"
FUSION = "adapter_fusion"
ROUTER = "router"
TASK_BANK = "task_bank"
_RECORD_KEYS = {
    SCALEARN: "_scalearn_fast_state",
    FUSION: "_scalearn_fast_fusion_state",
    ROUTER: "_scalearn_fast_router_state",
    TASK_BANK: "_scalearn_fast_task_bank",
}
_ATTACH_FN = {
    SCALEARN: "attach_scalearn",
    FUSION: "attach_fusion",
    ROUTER: "attach_router",
    TASK_BANK: "attach_task_bank",
}
_LABEL = {SCALEARN: "ScaLearn", FUSION: "AdapterFusion", ROUTER: "router", TASK_BANK: "task bank"}


@dataclass
class AttachRecord:
    """What an ``attach_*`` did to a model, kept on the model for the getters, saving and detach.

    ``kind`` is ``"scalearn"``, ``"adapter_fusion"``, ``"router"`` or ``"task_bank"``, which is
    also the name of the sub-layer on every patched module. ``source_paths`` are the folders the
    sources were read from (None for sources built in memory). ``variant`` and ``shared_omega``
    are ScaLearn's; ``name`` and ``config`` are AdapterFusion's (a router's options are in
    ``config`` too). ``hooked`` are the embedding modules carrying the gradient-checkpointing
    hook; ``handles`` are other hooks the attach registered (removed by its detach).
    """

    kind: str
    source_names: list[str]
    sites: list[FFNSite]
    backend: str
    requires_grad: dict[str, bool] = field(default_factory=dict)
    source_paths: list[str | None] = field(default_factory=list)
    variant: str = ""
    shared_omega: nn.Parameter | None = None
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    hooked: list[nn.Module] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    @property
    def attr(self) -> str:
        return self.kind

    @classmethod
    def over(
        cls, kind: str, sources: Sequence[Any], sites: list[FFNSite], backend: str, **fields: Any
    ) -> AttachRecord:
        """The record of attaching ``sources`` (their names and folders are recorded) at ``sites``."""
        names = [s.name for s in sources]
        return cls(kind, names, sites, backend, source_paths=[s.path for s in sources], **fields)


def get_record(model: nn.Module, kind: str) -> AttachRecord:
    """The record of ``kind`` on ``model``; a ValueError when nothing of that kind is attached."""
    record = model.__dict__.get(_RECORD_KEYS[kind])
    if record is None:
        raise ValueError(
            f"{type(model).__name__} has no {_LABEL[kind]} attached; call {_ATTACH_FN[kind]} first"
        )
    return record


def has_record(model: nn.Module, kind: str) -> bool:
    return _RECORD_KEYS[kind] in model.__dict__


def attached_layers(model: nn.Module, kind: str) -> list[nn.Module]:
    """The sub-layers of ``kind`` on every patched site, in site order."""
    record = get_record(model, kind)
    return [getattr(site.module, record.attr) for site in record.sites]


L = TypeVar("L", bound=nn.Module)


class AttachKind(Generic[L]):
    """The getters of one kind of attach (``scalearn``, ``adapter_fusion`` or ``router``), whose
    sub-layers are of type ``L``: ``record`` (a ValueError when none is attached), ``attached``
    and ``layers`` (in site order)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def record(self, model: nn.Module) -> AttachRecord:
        """The record of this kind's attach on ``model`` (a ValueError when none)."""
        return get_record(model, self.kind)

    def attached(self, model: nn.Module) -> bool:
        """Whether this kind is attached to ``model``."""
        return has_record(model, self.kind)

    def layers(self, model: nn.Module) -> list[L]:
        """This kind's sub-layers on every patched site of ``model``, in site order."""
        return attached_layers(model, self.kind)  # type: ignore[return-value]

    def fit_sources(self, model: nn.Module, sources: Sequence[Any]) -> tuple[list[FFNSite], int, str]:
        """Before attaching: check nothing of this kind is attached and the read ``sources`` fit
        the model's FFN sites. Returns the sites, the hidden size d and the sources' activation."""
        check_not_attached(model, self.kind)
        sites = ffn_sites(model)
        d = hidden_size(model)
        return sites, d, check_sources_fit(model, sources, sites, d)


def site_layer(
    layer_type: Callable[..., L],
    sources: Sequence[Any],
    site: FFNSite,
    *,
    activation: str,
    backend: str,
    like: torch.Tensor,
    cast: bool = False,
    **options: Any,
) -> L:
    """A ``layer_type`` sub-layer for ``site`` over the sources' weights there (four lists over
    the sources: w_down, b_down, w_up, b_up), with what every sub-layer takes (``activation``,
    ``backend``, the site's LayerNorm, the source names) and its own ``options``; on ``like``'s
    device (and, with ``cast``, its dtype)."""
    ws = [tuple(s.layers[site.key]) for s in sources]
    if site.pre_ln:  # no LayerNorm around the sub-layer there (docs/design.md, Sites)
        if "pre_ln" not in inspect.signature(layer_type).parameters:
            raise ValueError(
                f"{layer_type.__name__} does not support pre-LN sites ({site.name}); "
                "pre-LN models (mbart, t5, mt5, m2m_100) take attach_scalearn and attach_fusion"
            )
        options["pre_ln"] = True
    layer = layer_type(
        *([w[j] for w in ws] for j in range(4)),
        activation=activation,
        backend=backend,
        layer_norm=None if site.pre_ln else LayerNormRef(site.layer_norm),
        source_names=[s.name for s in sources],
        **options,
    )
    return layer.to(device=like.device, dtype=like.dtype if cast else None)


def check_not_attached(model: nn.Module, kind: str) -> None:
    if has_record(model, kind):
        raise RuntimeError(
            f"{_LABEL[kind]} is already attached to this model; detach_{_ATTACH_FN[kind][7:]} it first"
        )


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
    different ones, were saved for another model's key layout, have another hidden size than the
    model's ``d`` or cover other layers."""
    activations = {s.activation for s in sources}
    if len(activations) != 1:
        raise ValueError(f"sources use different non-linearities {sorted(activations)}")
    wanted = {s.key for s in sites}
    layout = SOURCE_LAYOUTS.get(sites[0].style)
    for src in sources:
        if src.layout is not None and layout is not None and src.layout != layout:
            raise ValueError(
                f"source {src.name!r} was saved for another model layout: its keys are the "
                f"{src.layout!r} kind, {type(model).__name__} ({model.config.model_type}) has "
                f"{layout!r} adapter sites; load an adapter trained for this model type"
            )
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


class InputsRequireGrad:
    """Forward hook on the model's embeddings: under gradient checkpointing in training, their
    output requires grad.

    With the base model frozen, nothing entering a checkpointed block requires grad, and the
    reentrant checkpoint then runs the block without autograd, so the ω / fusion weights inside
    it get no gradient. Marking the embeddings' output (as PEFT's ``enable_input_require_grads``
    does) makes every block's input require grad. It only acts while some module of the model has
    ``gradient_checkpointing`` on, so a run without checkpointing keeps its backward as it was.
    """

    def __init__(self, holders: Sequence[nn.Module]) -> None:
        self.holders = list(holders)  # the modules transformers sets gradient_checkpointing on

    def active(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.holders)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if (
            module.training
            and torch.is_grad_enabled()
            and isinstance(output, torch.Tensor)
            and output.is_floating_point()
            and not output.requires_grad
            and self.active()
        ):
            output.requires_grad_(True)


def hook_embeddings(model: nn.Module) -> list[nn.Module]:
    """Register ``InputsRequireGrad`` on every embedding module of ``model``; returns them."""
    holders = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    hook = InputsRequireGrad(holders)
    for module in embeddings:
        module.register_forward_hook(hook)
    return embeddings


def unhook_embeddings(modules: Sequence[nn.Module]) -> None:
    """Remove the ``InputsRequireGrad`` hooks (found by type, so copies of a model lose theirs)."""
    for module in modules:
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, InputsRequireGrad):
                del module._forward_hooks[key]


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


def attach(
    model: nn.Module,
    record: AttachRecord,
    build: Callable[[FFNSite], nn.Module],
    trainable: Callable[[], list[nn.Parameter]],
    *,
    freeze: bool,
) -> nn.Module:
    """Patch ``record.sites`` with ``build``, keep ``record`` on the model, hook the embeddings
    for gradient checkpointing and (with ``freeze``) let only ``trainable()`` and the task head
    train. All or nothing."""
    check_not_attached(model, record.kind)
    record.requires_grad = patch_sites(model, record.sites, record.attr, build, freeze=freeze)
    record.hooked = hook_embeddings(model)
    model.__dict__[_RECORD_KEYS[record.kind]] = record
    if freeze:
        for p in [*(p for _, p in head_parameters(model)), *trainable()]:
            p.requires_grad_(True)
    return model


def detach(model: nn.Module, kind: str) -> AttachRecord:
    """Undo ``attach``: original forwards, hooks and ``requires_grad`` flags come back."""
    record = get_record(model, kind)
    restore_sites(model, record.sites, record.attr, record.requires_grad)
    unhook_embeddings(record.hooked)
    del model.__dict__[_RECORD_KEYS[kind]]
    return record
