"""``accelerate`` / ``deaccelerate``: a model prepared with the `adapters` library, its active
AdapterFusion computed by this package's fused layers, in place.

``accelerate(model)`` takes a model after ``adapters.init``, ``add_adapter`` (SeqBn/Pfeiffer
adapters), ``add_adapter_fusion`` and ``set_active_adapters(Fuse(...))`` (or
``Stack(Fuse(...))``), with its fusion trained or loaded, and routes every FFN output sub-layer
through an ``AdapterFusionLayer`` that computes the same function. Nothing is copied:

- the fusion's query/key/value are the library's own ``nn.Linear`` modules (same Parameters:
  an optimizer built before or after sees the same tensors, and what trains is what the library
  saves with ``save_adapter_fusion``);
- the sources are packed once, and the library's adapter Parameters then point into that
  packed storage (``param.data`` views; the Parameter objects stay the same).

``deaccelerate(model)`` (or leaving ``with accelerated(model):``) gives the library its modules
back: its forward again, the fusion's annealed temperature, adapter weights in storage of their
own. Save with the library after it (its files hold each tensor's whole storage otherwise).
Compositions the fused layers do not compute exactly are refused, naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..formats.adapterhub import AdapterSource, AdapterWeights, check_adapter_config
from ..formats.fusion import FUSION_CONFIGS
from ..layers_fusion import AdapterFusionLayer, fusion_options_from_config
from .attach import FUSION, AttachRecord, attach, check_not_attached, check_sites_free, detach, site_layer
from .fusion import fusion_layers
from .registry import FFNSite, ffn_sites

_KEY = "_scalearn_fast_accelerated"
_FUSION_FIELDS = set(FUSION_CONFIGS["dynamic"]) | {"architecture"}
_PARAMS = (("adapter_down", 0, "weight"), ("adapter_down", 0, "bias"), ("adapter_up", None, "weight"),
           ("adapter_up", None, "bias"))  # fmt: skip


@dataclass
class _Accelerated:
    """What ``accelerate`` changed beyond the attach record: the setup it computes, the source
    flags it froze (``freeze_sources``), the forward pre-hook guarding the setup."""

    setup: Any
    fuse_name: str
    frozen: dict[int, tuple[nn.Parameter, bool]] = field(default_factory=dict)
    hook: Any = None


def is_accelerated(model: nn.Module) -> bool:
    return _KEY in model.__dict__


def _library():
    try:
        from adapters import BnConfig
        from adapters.composition import Fuse, Stack
        from adapters.methods.bottleneck import BottleneckLayer
    except Exception as exc:  # not installed, or not importable with this transformers
        raise ImportError(f"accelerate needs the `adapters` library, which is not importable: {exc}") from exc
    return Fuse, Stack, BottleneckLayer, BnConfig


def _active_fuse(setup: Any) -> Any:
    """The Fuse block the active setup computes; a ValueError naming any other composition."""
    Fuse, Stack, _, _ = _library()
    if setup is None:
        raise ValueError(
            "the model has no active adapter setup; set_active_adapters(Fuse(...)) before accelerate"
        )
    fuse = setup
    if isinstance(setup, Stack) and len(setup.children) == 1 and isinstance(setup.children[0], str):
        raise ValueError(
            f"the active setup {setup} is a single adapter; nothing to fuse (accelerate computes "
            "Fuse(...) or Stack(Fuse(...)))"
        )
    if isinstance(setup, Stack):
        if len(setup.children) != 1 or not isinstance(setup.children[0], Fuse):
            raise ValueError(
                f"the active setup {setup} is a Stack of {len(setup.children)} children; accelerate computes "
                "Fuse(...) or Stack(Fuse(...)) with the Fuse alone (a Stack of adapters runs them one after "
                "another, which the fused layers do not)"
            )
        fuse = setup.children[0]
    if not isinstance(fuse, Fuse):
        what = "a single adapter" if isinstance(fuse, str) else f"a {type(fuse).__name__} block"
        raise ValueError(
            f"the active setup {setup} is {what}; accelerate computes Fuse(...) or Stack(Fuse(...)) only "
            "(Parallel, BatchSplit, Split, Average and MultiTask are not fused compositions)"
        )
    nested = [c for c in fuse.children if not isinstance(c, str)]
    if nested:
        raise ValueError(
            f"the active Fuse {fuse} fuses the composition {nested[0]}; accelerate fuses plain adapters only"
        )
    return fuse


def _fusion_config(model: nn.Module, fuse: Any) -> dict[str, Any]:
    found = model.adapters_config.get_fusion(fuse.name)
    config = found[0] if isinstance(found, tuple) else found
    if config is None:
        raise ValueError(f"the model has no AdapterFusion named {fuse.name!r}; add_adapter_fusion it first")
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(config) - _FUSION_FIELDS)
    if unknown:
        raise ValueError(
            f"fusion {fuse.name!r} has config fields {unknown} that the fused layers do not implement; "
            f"they compute {sorted(_FUSION_FIELDS - {'architecture'})}"
        )
    return config


def _source_settings(model: nn.Module, names: list[str]) -> tuple[str, float | list[float]]:
    """The sources' common activation and their scalings; a ValueError naming a source whose
    config the fused layers do not compute."""
    _, _, _, BnConfig = _library()
    activations, scalings = set(), []
    for name in names:
        config = model.adapters_config.get(name)
        if not isinstance(config, BnConfig):
            raise ValueError(
                f"adapter {name!r} is a {type(config).__name__}; accelerate fuses bottleneck (SeqBn) adapters"
            )
        as_dict = config.to_dict()
        activations.add(check_adapter_config(as_dict, f"adapter {name!r}"))
        if as_dict.get("stochastic_depth", 0.0):
            raise ValueError(
                f"adapter {name!r} has stochastic_depth={as_dict['stochastic_depth']}; not computed by the "
                "fused layers"
            )
        scalings.append(float(as_dict.get("scaling", 1.0)))
    if len(activations) != 1:
        raise ValueError(f"the fused adapters use different non-linearities {sorted(activations)}")
    return activations.pop(), scalings[0] if len(set(scalings)) == 1 else scalings


def _check_sites(model: nn.Module, sites: list[FFNSite], names: list[str], fuse_name: str) -> None:
    _, _, BottleneckLayer, _ = _library()
    skip = model.adapters_config.skip_layers
    if skip:
        raise ValueError(f"the model skips adapters in layers {skip}; accelerate needs them in every layer")
    for site in sites:
        module = site.module
        if not isinstance(module, BottleneckLayer):
            raise ValueError(
                f"{site.name} ({type(module).__name__}) is not where the library runs its adapters "
                f"({type(model).__name__}); accelerate supports models whose FFN output module is the "
                "library's bottleneck layer (BERT, RoBERTa, XLM-R, ...)"
            )
        missing = [n for n in names if n not in module.adapters]
        if missing or fuse_name not in module.adapter_fusion_layer:
            what = f"adapters {missing}" if missing else f"the fusion layer {fuse_name!r}"
            raise ValueError(f"{site.name} lacks {what} (leave_out?); accelerate needs every layer fused")


def _param(adapter: nn.Module, part: str, index: int | None, name: str) -> nn.Parameter:
    module = getattr(adapter, part)
    return getattr(module[index] if index is not None else module, name)


def _source_params(site: FFNSite, names: list[str]) -> list[list[nn.Parameter]]:
    return [[_param(site.module.adapters[n], *spec) for spec in _PARAMS] for n in names]


def _share_sources(layer: AdapterFusionLayer, params: list[list[nn.Parameter]]) -> None:
    """Point the library's adapter Parameters into the layer's packed storage (same values)."""
    lo = 0
    with torch.no_grad():
        for i, (w_down, b_down, w_up, b_up) in enumerate(params):
            r = w_down.shape[0]
            w_down.data = layer.w_down.data[lo : lo + r]
            b_down.data = layer.b_down.data[lo : lo + r]
            w_up.data = layer.w_up.data[:, lo : lo + r]
            b_up.data = layer.b_up.data[i]
            lo += r


def _setup_key(setup: Any) -> Any:
    """A comparable form of an adapter setup (the library's ``==`` ignores extra children)."""
    if setup is None or isinstance(setup, str):
        return setup
    name = getattr(setup, "name", None) if type(setup).__name__ == "Fuse" else None
    return (type(setup).__name__, name, tuple(_setup_key(c) for c in setup.children))


def _guard(state: _Accelerated):
    def check(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        from adapters.context import AdapterSetup

        context = AdapterSetup.get_context()
        setup = context.adapter_setup if context is not None else module.adapters_config.active_setup
        if _setup_key(setup) != _setup_key(state.setup):
            raise ValueError(
                f"the model was accelerated for {state.setup}, but this forward asks for {setup}; "
                "deaccelerate(model) first (or accelerate again for the new setup)"
            )
        if kwargs.get("output_adapter_fusion_attentions"):
            raise ValueError(
                "output_adapter_fusion_attentions=True: the fused layers do not return the fusion "
                "attentions; deaccelerate(model) for that forward"
            )

    return check


def accelerate(model: nn.Module, *, backend: str = "auto", freeze_sources: bool = False) -> nn.Module:
    """Compute the `adapters` model's active ``Fuse`` (or ``Stack(Fuse)``) with the fused layers.

    The library's fusion modules and adapter weights are shared, not copied (see the module
    docstring); outputs stay the same, in eval and in training mode (the score dropout draws its
    own masks). The sources stay frozen: a source Parameter that requires grad is refused
    (``model.train_adapter_fusion(...)`` freezes them), unless ``freeze_sources=True``, which turns
    their ``requires_grad`` off until ``deaccelerate``. Refused, naming the reason: other
    compositions (a Stack of several blocks, Parallel, BatchSplit, Split, Average, nested
    blocks), fusion config fields the layers do not implement, non-SeqBn adapters, skipped
    layers, models whose FFN output is not the library's bottleneck layer. Returns ``model``.
    Move the model to its device and dtype before this (``.to()`` afterwards gives the library's
    adapter weights copies of their own; outputs stay right).
    """
    if not hasattr(model, "adapters_config"):
        raise ValueError(
            f"{type(model).__name__} is not prepared with the adapters library (adapters.init(model), "
            "add_adapter, add_adapter_fusion, set_active_adapters(Fuse(...)))"
        )
    if is_accelerated(model):
        raise RuntimeError("the model is already accelerated; deaccelerate(model) first")
    check_not_attached(model, FUSION)
    setup = model.adapters_config.active_setup
    fuse = _active_fuse(setup)
    names = list(fuse.children)
    config = _fusion_config(model, fuse)
    activation, scaling = _source_settings(model, names)
    sites = ffn_sites(model)
    check_sites_free(sites)
    _check_sites(model, sites, names, fuse.name)

    state = _Accelerated(setup, fuse.name)
    trainable = [
        (site, p) for site in sites for ps in _source_params(site, names) for p in ps if p.requires_grad
    ]  # fmt: skip
    if trainable and not freeze_sources:
        raise ValueError(
            f"source adapter weights require grad ({trainable[0][0].name}, ...): the fused layers keep the "
            "sources frozen. Freeze them (model.train_adapter_fusion(Fuse(...)) does) or pass "
            "freeze_sources=True"
        )
    for _, p in trainable:
        state.frozen[id(p)] = (p, True)
        p.requires_grad_(False)
    param = next(model.parameters())
    if isinstance(scaling, list):
        scaling = torch.tensor(scaling, device=param.device)

    def build(site: FFNSite) -> AdapterFusionLayer:
        params = _source_params(site, names)
        srcs = [
            AdapterSource(n, {site.key: AdapterWeights(*(p.detach() for p in ps))}, activation)
            for n, ps in zip(names, params, strict=True)
        ]
        library = site.module.adapter_fusion_layer[fuse.name]
        options = fusion_options_from_config(config, float(library.dropout.p))
        options["dropout"] = float(library.dropout.p)
        layer = site_layer(
            AdapterFusionLayer, srcs, site, activation=activation, backend=backend, like=param,
            scaling=scaling, **options,
        )  # fmt: skip
        for proj in ("query", "key", "value"):
            setattr(layer, proj, getattr(library, proj) if config.get(proj) else None)
        layer.T, layer.reduction = library.T, library.reduction
        _share_sources(layer, params)
        return layer

    record = AttachRecord(FUSION, names, sites, backend, source_paths=[None] * len(names), name=fuse.name,
                          config=config)  # fmt: skip
    try:
        attach(model, record, build, lambda: [], freeze=False)
    except BaseException:
        _unshare(sites, names)
        for p, flag in state.frozen.values():
            p.requires_grad_(flag)
        raise
    state.hook = model.register_forward_pre_hook(_guard(state), with_kwargs=True)
    model.__dict__[_KEY] = state
    return model


def _unshare(sites: list[FFNSite], names: list[str]) -> None:
    """Give the library's adapter Parameters contiguous storage of their own again."""
    with torch.no_grad():
        for site in sites:
            for ps in _source_params(site, names):
                for p in ps:
                    p.data = p.data.clone(memory_format=torch.contiguous_format)


def deaccelerate(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: the library's forward, its fusion temperature, adapter weights with
    storage of their own, the ``requires_grad`` flags ``freeze_sources`` changed."""
    state = model.__dict__.get(_KEY)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not accelerated; nothing to undo")
    layers = fusion_layers(model)
    record = detach(model, FUSION)
    for site, layer in zip(record.sites, layers, strict=True):
        site.module.adapter_fusion_layer[state.fuse_name].T = layer.T
    _unshare(record.sites, record.source_names)
    for p, flag in state.frozen.values():
        p.requires_grad_(flag)
    state.hook.remove()
    del model.__dict__[_KEY]
    return model


@contextmanager
def accelerated(model: nn.Module, **options: Any) -> Iterator[nn.Module]:
    """``with accelerated(model):`` the model runs on the fused layers; the library's modules come
    back on exit (also on an exception). ``options`` go to ``accelerate``."""
    accelerate(model, **options)
    try:
        yield model
    finally:
        deaccelerate(model)
