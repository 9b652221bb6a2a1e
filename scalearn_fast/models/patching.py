"""Per-instance, reversible forward patching.

``patch_forward(module, fn)`` sets ``module.forward = fn`` on that one instance (the class and
every other instance keep theirs); ``unpatch(module)`` restores what was there before.
``original_forward(module)`` is the forward in place before the patch, for the new forward to
call (it does not go through ``__call__``, so patching a module that the new forward itself
uses, such as a LayerNorm, does not recurse).

Patched modules survive ``copy.deepcopy`` and pickling when the new forward is a plain object
holding the module (``SiteForward``, as ``patch_site`` makes them): a closure would keep pointing
at the original module after a copy, and a closure or bound method does not pickle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import has_global_hooks, has_hooks
from .native_site import NativeSite, build_output_site, build_summed_site

_SAVED = "_scalearn_fast_saved_forward"
_SITE_ATTR = "_scalearn_fast_site_attr"


def is_patched(module: nn.Module) -> bool:
    return _SAVED in module.__dict__


def original_forward(module: nn.Module) -> Callable[..., Any]:
    """The forward that ``patch_forward`` replaced (or the current one when unpatched)."""
    if is_patched(module):
        saved = module.__dict__[_SAVED]
        if saved is not None:
            return saved
        return type(module).forward.__get__(module, type(module))
    return module.forward


def patch_forward(module: nn.Module, new_forward: Callable[..., Any]) -> None:
    """Replace ``module``'s forward for this instance only; raises if it is already patched."""
    if is_patched(module):
        raise RuntimeError(f"{type(module).__name__} is already patched; unpatch it first")
    module.__dict__[_SAVED] = module.__dict__.get("forward")  # None: the class forward
    module.__dict__["forward"] = new_forward


def unpatch(module: nn.Module) -> None:
    """Undo ``patch_forward`` (no-op on an unpatched module)."""
    if not is_patched(module):
        return
    saved = module.__dict__.pop(_SAVED)
    if saved is None:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = saved


class LayerNormRef:
    """Calls a LayerNorm's own class forward without registering it as a submodule.

    Sub-layers get this instead of the module itself: no duplicate keys in ``state_dict`` and
    no recursion when the LayerNorm is the patched module (BART's ``final_layer_norm``).
    """

    def __init__(self, layer_norm: nn.Module) -> None:
        self.module = layer_norm

    def __call__(self, x: Any) -> Any:
        return type(self.module).forward(self.module, x)


def _direct_call_allowed(sublayer: nn.Module) -> bool:
    """Whether nothing (hooks on ``sublayer``, global hooks, ``torch.compile``) needs the call to
    go through ``nn.Module.__call__``."""
    return not (has_hooks(sublayer) or has_global_hooks() or torch.compiler.is_compiling())


def _call_sublayer(module: nn.Module, h: Any, x: Any) -> Any:
    """``sublayer(h, x)`` for the sub-layer registered on ``module``. Without hooks on it (or
    global ones) its ``forward`` runs directly: ``nn.Module.__call__``'s bookkeeping costs more
    host time than the rest of an eval-mode sub-layer call at small shapes."""
    sublayer = module._modules[module.__dict__[_SITE_ATTR]]
    if _direct_call_allowed(sublayer):
        return sublayer.forward(h, x)
    return sublayer(h, x)


def _call_summed(module: nn.Module, summed: Any) -> Any:
    """The sub-layer at a site that sees only ``s = h + x``: its ``forward_summed(s)`` when it has
    one and may be called directly (no zeros made, none added: a decoding step runs this once
    per layer), else ``sublayer(s, zeros)``."""
    sublayer = module._modules[module.__dict__[_SITE_ATTR]]
    forward = module.__dict__.get("forward")
    site = forward if type(forward) is SiteForward else None
    eager = not torch.compiler.is_compiling()
    native = None if site is None else site.native
    if native is not None and eager:
        out = native[0](summed, native[1], native[2])
        if out is False:  # stale: the Python path runs and a new native site is built
            site.native = native = None  # type: ignore[union-attr]
        elif out is not None:
            return out
    summed_forward = getattr(type(sublayer), "forward_summed", None)
    if summed_forward is not None and _direct_call_allowed(sublayer):
        out = summed_forward(sublayer, summed)
        if (
            native is None
            and eager
            and site is not None
            and site.allow_native
            and isinstance(out, torch.Tensor)
        ):
            site.native = build_summed_site(module, sublayer, out)
        return out
    return _call_sublayer(module, summed, summed.new_zeros(()).expand_as(summed))


def _output_forward(self: nn.Module, hidden_states: Any, input_tensor: Any, *args: Any, **kwargs: Any) -> Any:
    """Patched ``forward(hidden_states, input_tensor)`` of a BERT-like FFN output module:
    ``sublayer(dropout(dense(hidden_states)), input_tensor)``. This runs once per layer of every
    step, so ``_call_sublayer`` is written out, and where nothing observes the two modules (no
    hooks; a plain ``nn.Linear``; an ``nn.Dropout`` in eval mode, the identity) the FFN's output
    projection is its one ATen call."""
    modules = self._modules
    dense, dropout = modules["dense"], modules["dropout"]
    sublayer = modules[self.__dict__[_SITE_ATTR]]
    if _direct_call_allowed(sublayer):
        if (
            type(dense) is nn.Linear
            and type(dropout) is nn.Dropout
            and not dropout.training
            and not has_hooks(dense)
            and not has_hooks(dropout)
        ):
            params = dense._parameters
            return sublayer.forward(F.linear(hidden_states, params["weight"], params["bias"]), input_tensor)
        return sublayer.forward(dropout(dense(hidden_states)), input_tensor)
    return sublayer(dropout(dense(hidden_states)), input_tensor)


def _post_ln_forward(self: nn.Module, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
    """Patched ``forward`` of a post-FFN LayerNorm: its input is already ``h + x``."""
    return _call_summed(self, hidden_states)


def _pre_ln_ff_forward(self: nn.Module, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
    """Patched ``forward(x)`` of a T5 FFN sub-layer: ``h = dropout(DenseReluDense(layer_norm(x)))``."""
    h = self.dropout(self.DenseReluDense(self.layer_norm(hidden_states)))
    return _call_sublayer(self, h, hidden_states)


def _pre_ln_layer_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Patched ``forward`` of a pre-LN transformer layer (mBART, M2M100): the layer runs as
    before; its first output, ``h + x`` after the FFN, goes through the sub-layer."""
    out = original_forward(self)(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return _call_summed(self, out)
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return (_call_summed(self, out[0]), *out[1:])
    raise TypeError(
        f"{type(self).__name__}.forward returned {type(out).__name__}; expected the hidden states "
        "(a tensor, or a tuple starting with one)"
    )


_STYLES = {
    "output": _output_forward,
    "post_ln": _post_ln_forward,
    "pre_ln_ff": _pre_ln_ff_forward,
    "pre_ln_layer": _pre_ln_layer_forward,
}


class SiteForward:
    """The patched forward of one site: copies and pickles along with its module.

    A site whose sub-layer runs a prepared eval path (AdapterFusion's fold, ScaLearn's torch
    runner) also keeps a native site (``models/native_site.py``) when the C++ extension is built:
    an ``output`` site here, the summed styles (``post_ln``, ``pre_ln_layer``) in
    ``_call_summed``. It is one C++ call with bitwise the Python path's result, which checks on
    every call that the Python path would still take that route and hands the call back
    otherwise. Set ``allow_native = False`` on an instance to keep it in Python."""

    native: NativeSite | None = None  # not pickled or copied: rebuilt on the first call
    allow_native = True

    def __init__(self, module: nn.Module, style: str) -> None:
        self.module = module
        self.style = style

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("native", None)
        return state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.style != "output":  # the summed styles keep theirs in ``_call_summed``
            return _STYLES[self.style](self.module, *args, **kwargs)
        eager_pair = len(args) == 2 and not kwargs and not torch.compiler.is_compiling()
        native = self.native
        if native is not None and eager_pair:
            out = native[0](args[0], args[1], native[1], native[2])
            if out is False:  # stale: the Python path runs and a new native site is built
                self.native = native = None
            elif out is not None:
                return out
        out = _STYLES[self.style](self.module, *args, **kwargs)
        if native is None and eager_pair and self.allow_native:
            self.native = _native_output_site(self.module, out)
        return out


def _native_output_site(module: nn.Module, out: Any) -> NativeSite | None:
    if not isinstance(out, torch.Tensor):
        return None
    modules = module._modules
    sublayer = modules[module.__dict__[_SITE_ATTR]]
    return build_output_site(module, modules["dense"], modules["dropout"], sublayer, out)


def patch_site(site: Any, sublayer: nn.Module, attr: str) -> None:
    """Route ``site`` (a registry ``FFNSite``) through ``sublayer(h, x)``, which must return the
    sub-layer's final output (``LN(... + h + x)`` at a post-LN site, ``... + h + x`` at a pre-LN
    one). ``sublayer`` is registered on the patched module as ``attr`` so it moves with ``.to()``
    and shows in ``named_parameters``."""
    module = site.module
    if is_patched(module):
        raise RuntimeError(f"{site.name} is already patched; detach what holds it first")
    if hasattr(module, attr):
        raise RuntimeError(f"{site.name} already has an attribute {attr!r}")
    if site.style not in _STYLES:
        raise ValueError(f"unknown site style {site.style!r}; expected one of {sorted(_STYLES)}")
    module.add_module(attr, sublayer)
    module.__dict__[_SITE_ATTR] = attr
    patch_forward(module, SiteForward(module, site.style))


def unpatch_site(site: Any, attr: str) -> nn.Module | None:
    """Undo ``patch_site``; returns the removed sub-layer."""
    module = site.module
    unpatch(module)
    module.__dict__.pop(_SITE_ATTR, None)
    return module._modules.pop(attr, None)


def restore_sites(model: nn.Module, sites: Any, attr: str, requires_grad: dict[str, bool] | None) -> None:
    """Undo an ``attach_*``: unpatch every site still carrying ``attr`` and put back the
    ``requires_grad`` flags recorded before it froze the model."""
    for site in sites:
        if hasattr(site.module, attr):
            unpatch_site(site, attr)
    if requires_grad:
        for name, p in model.named_parameters():
            if name in requires_grad:
                p.requires_grad_(requires_grad[name])
