"""Whether anything observes a module's call: its own hooks, or the global ones. The patched
sites skip ``nn.Module.__call__`` (and the native site skips Python) only where nothing does."""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules import module as _nn_module

GLOBAL_HOOKS = (
    _nn_module._global_forward_hooks,
    _nn_module._global_forward_pre_hooks,
    _nn_module._global_backward_hooks,
    _nn_module._global_backward_pre_hooks,
)


def hook_dicts(module: nn.Module) -> tuple[dict, ...]:
    """``module``'s own hook dicts (forward, forward-pre, backward, backward-pre)."""
    return (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    )


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of its own."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def has_global_hooks() -> bool:
    return any(GLOBAL_HOOKS)
