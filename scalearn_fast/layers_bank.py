"""``TaskBankLayer``: N frozen source adapters and the ω of K target tasks for one transformer layer.

Sub-layer form as ``ScaLearnLayer``'s, with each sequence b scaled by its own task's ω:

    z = LN(h + x)
    y[b] = LN(Σ_i Ω[k(b), i] ⊙ A_i(z[b]) + h[b] + x[b])

The tasks' ω live in one Parameter per variant group (``GROUPS``): the per-layer variants
(``scalearn`` [K, N, d], ``scalearn_uniform`` [K, N, 1]) hold a Parameter of their own in every
layer; the ``++`` variants hold one Parameter that every layer shares (as a ``++`` model's one
ω), so training keeps it tied. The bank a call uses is the groups stacked in ``GROUPS`` order
(uniform groups broadcast to d when a vector group is present), cached in eval mode.
The rows of the current batch come from a ``TaskRows`` shared by every layer of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .layers_base import FrozenSources, weights_key
from .ops.backends import resolve_backend
from .ops.packing import TensorOrList, check_activation
from .ops.scaled_adapter_sum_bank import compose_bank

GROUPS = ("scalearn", "scalearn_uniform", "scalearn++", "scalearn_uniform++")
"""The variant groups, in the order their rows are stacked in a layer's bank."""


class TaskRows:
    """What every layer of a task-bank model reads (a plain object: not a module, not state):
    ``rows``, the bank row of each sequence of the batch being run ([B] int64), set by the
    model's task-bank forward; ``dropout``, each group's per-task ω dropout probabilities."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.dropout: dict[str, torch.Tensor] = {}


class TaskBankLayer(FrozenSources):
    """The composition of N frozen sources with K tasks' ω, one site.

    Args:
        w_down, b_down, w_up, b_up: the shared sources (as for ``ScaLearnLayer``).
        groups: per variant group, the Parameter [K_g, N, d or 1] of its tasks' ω (``++`` groups:
            the same Parameter in every layer). Empty groups may be omitted.
        task_rows: the ``TaskRows`` shared by the model's layers.
        activation, backend, layer_norm, source_names: as for ``ScaLearnLayer``.
    """

    def __init__(
        self,
        *sources: TensorOrList,
        groups: dict[str, nn.Parameter],
        task_rows: TaskRows,
        activation: str = "relu",
        backend: str = "auto",
        layer_norm: nn.Module | None = None,
        source_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(*sources, source_names=source_names)
        self.activation = check_activation(activation)
        self.backend = backend
        self.layer_norm = layer_norm
        self.task_rows = task_rows
        self.set_groups(groups)

    def set_groups(self, groups: dict[str, nn.Parameter]) -> None:
        """Replace the tasks' ω (``add_task`` / ``remove_task``)."""
        n, d = self.num_sources, self.hidden_size
        for name in GROUPS:
            param = groups.get(name)
            if param is not None:
                width = 1 if name.startswith("scalearn_uniform") else d
                if param.dim() != 3 or tuple(param.shape[1:]) != (n, width):
                    shape = list(param.shape)
                    raise ValueError(
                        f"the {name} group's omega has shape {shape}, expected [K, N={n}, {width}]"
                    )
            self.register_parameter(_attr(name), param)
        self._folded = None

    def group(self, name: str) -> nn.Parameter | None:
        return self._parameters[_attr(name)]

    def bank(self) -> torch.Tensor:
        """Ω [K, N, d or 1]: the groups stacked in ``GROUPS`` order. In training each task's ω
        is dropped out with its own probability (a fresh mask per call, as ``ScaLearnLayer``)."""
        parts = []
        for g in GROUPS:
            p = self.group(g)
            if p is not None and p.shape[0]:
                parts.append(self._dropped(p, self.task_rows.dropout.get(g)) if self.training else p)
        if not parts:
            raise ValueError("the task bank holds no task")
        if any(p.shape[-1] != 1 for p in parts):
            parts = [p.expand(-1, -1, self.hidden_size) for p in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _dropped(omega: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        """``omega`` [K_g, N, c] with row k dropped out with probability ``probs[k]``."""
        if probs is None or not bool((probs > 0).any()):
            return omega
        p = probs.to(omega.device, omega.dtype).reshape(-1, 1, 1)
        keep = torch.rand_like(omega) >= p
        return omega * keep / (1 - p)

    def _bank_for(self, z: torch.Tensor) -> torch.Tensor:
        """The bank in z's dtype; cached while nothing differentiates and no group changed."""
        if self.training or torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self.bank().to(z.dtype)
        groups = [p for p in (self.group(g) for g in GROUPS) if p is not None]
        key = (z.dtype, z.device, weights_key(groups))
        return self._cached(key, lambda: self.bank().detach().to(z.dtype))

    @torch.compiler.disable  # the bank's K and its rows change with add_task: kept out of graphs
    def compose(self, z: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_i Ω[k(b), i] ⊙ A_i(z[b]) + residual`` for ``z [B, ..., d]``, the rows of the
        model's current batch."""
        rows = self.task_rows.rows
        if rows is None:
            raise RuntimeError("a task-bank model runs with task=[...] (one task per sequence)")
        if z.shape[0] != rows.shape[0]:
            raise ValueError(f"z has {z.shape[0]} sequences, task= named {rows.shape[0]}")
        backend = resolve_backend(self.backend, z.device)
        packed = self.packed().to(z.dtype)
        return compose_bank(
            z, packed, self._bank_for(z), rows.to(z.device), residual, self.activation, backend
        )

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """The full sub-layer ``LN(Σ Ω[k] ⊙ A_i(LN(h + x)) + h + x)``."""
        return self.post_ln_sublayer(hidden_states, input_tensor)

    def extra_repr(self) -> str:
        sizes = {g: p.shape[0] for g in GROUPS if (p := self.group(g)) is not None}
        return f"num_sources={self.num_sources}, hidden_size={self.hidden_size}, tasks={sizes}"


def _attr(group: str) -> str:
    return "omega_" + group.replace("++", "_shared")
