"""Per-instance, reversible forward patching.

``patch_forward(module, fn)`` sets ``module.forward = fn`` on that one instance (the class and
every other instance keep theirs); ``unpatch(module)`` restores what was there before.
``original_forward(module)`` is the forward in place before the patch, for the new forward to
call (it does not go through ``__call__``, so patching a module that the new forward itself
uses, such as a LayerNorm, does not recurse).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

_SAVED = "_scalearn_fast_saved_forward"
_MISSING = object()


def is_patched(module: nn.Module) -> bool:
    return _SAVED in module.__dict__


def original_forward(module: nn.Module) -> Callable[..., Any]:
    """The forward that ``patch_forward`` replaced (or the current one when unpatched)."""
    if is_patched(module):
        saved = module.__dict__[_SAVED]
        if saved is not _MISSING:
            return saved
        return type(module).forward.__get__(module, type(module))
    return module.forward


def patch_forward(module: nn.Module, new_forward: Callable[..., Any]) -> None:
    """Replace ``module``'s forward for this instance only; raises if it is already patched."""
    if is_patched(module):
        raise RuntimeError(f"{type(module).__name__} is already patched; unpatch it first")
    module.__dict__[_SAVED] = module.__dict__.get("forward", _MISSING)
    module.__dict__["forward"] = new_forward


def unpatch(module: nn.Module) -> None:
    """Undo ``patch_forward`` (no-op on an unpatched module)."""
    if not is_patched(module):
        return
    saved = module.__dict__.pop(_SAVED)
    if saved is _MISSING:
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


def patch_site(site: Any, sublayer: nn.Module, attr: str) -> None:
    """Route ``site`` (a registry ``FFNSite``) through ``sublayer(h, x)``, which must return the
    sub-layer's final output ``LN(... + h + x)``. ``sublayer`` is registered on the patched
    module as ``attr`` so it moves with ``.to()`` and shows in ``named_parameters``."""
    module = site.module
    if hasattr(module, attr):
        raise RuntimeError(f"{site.name} already has an attribute {attr!r}")
    if site.style == "output":

        def forward(hidden_states, input_tensor, *args, **kwargs):
            h = module.dropout(module.dense(hidden_states))
            return sublayer(h, input_tensor)

    elif site.style == "post_ln":

        def forward(hidden_states, *args, **kwargs):  # hidden_states = h + x already
            return sublayer(hidden_states, hidden_states.new_zeros(()).expand_as(hidden_states))

    else:
        raise ValueError(f"unknown site style {site.style!r}")
    module.add_module(attr, sublayer)
    patch_forward(module, forward)


def unpatch_site(site: Any, attr: str) -> nn.Module | None:
    """Undo ``patch_site``; returns the removed sub-layer."""
    module = site.module
    unpatch(module)
    sub = module._modules.pop(attr, None)
    return sub
