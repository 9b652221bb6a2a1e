"""``RouterLayer``: N frozen source adapters composed by a trainable router, for one layer (L2R).

Sub-layer form (docs/routing.md), with ``h`` the FFN output, ``x`` its residual input, ``LN``
the layer's own pre-trained output LayerNorm and ``g`` the router's gates:

    z = LN(h + x)
    g = gate(router(z))                      per token, or from z mean-pooled over real tokens
    y = LN(Σ_i g_i·A_i(z) + h + x)          mode "output"
    y = LN(A_merged(g)(z) + h + x)           mode "merge": A_merged's parameters are Σ_i g_i·θ_i

In merge mode a sequence router's B merged adapters are built (B·N·2·r·d multiply-adds) and
run as batched rank-r GEMMs; per-token gates run the packed two-GEMM form without merged
weights (``ops/routing.py``).

The router is one ``nn.Linear(d, N)`` initialised to zero (softmax gates start uniform). With
``granularity="sequence"`` it reads z mean-pooled over each sequence's real (non-padding)
tokens: the attention mask comes from ``compose(..., attention_mask=)`` or, inside a model
prepared by ``attach_router``, from the ``RoutingContext`` its forward pre-hook fills.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers_base import FrozenSources
from .ops.activations import check_activation
from .ops.packing import TensorOrList
from .ops.routing import (
    check_equal_ranks,
    check_gate,
    check_gates,
    gates,
    masked_mean,
    merged_adapter_sum,
    merged_adapter_sum_per_sequence,
    merged_adapter_sum_reference,
)
from .ops.scaled_adapter_sum import scaled_adapter_sum_packed

GRANULARITIES = ("token", "sequence")
MODES = ("output", "merge")


class RoutingContext:
    """The attention masks of the model call in progress, per stack (``"encoder"``,
    ``"decoder"``), for the sequence-level routers of that model. ``attach_router`` fills it
    from the model's ``attention_mask`` / ``decoder_attention_mask`` arguments before every
    forward; a mask stays until the next forward overwrites it (a gradient-checkpointed
    backward recomputes the layers and needs it again)."""

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor | None] = {}

    def mask(self, stack: str) -> torch.Tensor | None:
        return self.masks.get(stack)


def check_router_options(
    gate: str, k: int | None, granularity: str, mode: str, num_sources: int
) -> int | None:
    """``k`` as the gate uses it; a ValueError naming the argument for any bad option."""
    k = check_gate(gate, k, num_sources)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    return k


class RouterLayer(FrozenSources):
    """Router-weighted composition of N frozen bottleneck adapters for one layer.

    Args:
        w_down, b_down, w_up, b_up: the sources in nn.Linear layout, stacked or per-source lists.
        gate: ``softmax``, ``sigmoid`` or ``topk`` (with ``k``).
        k: the number of sources kept by ``topk`` (1 <= k <= N).
        granularity: ``token`` (a gate per token) or ``sequence`` (one per sequence, from the
            mean of z over its real tokens).
        mode: ``output`` (weight the adapters' outputs) or ``merge`` (weight their parameters;
            equal ranks required).
        activation: the adapters' non-linearity.
        backend: the core op's backend for ``output`` mode (``reference`` also selects the
            loop oracle in ``merge`` mode).
        layer_norm: the layer's pre-trained output LayerNorm, used by ``forward``.
        source_names: optional names of the N sources, in order.
        context: where a model-level hook leaves the attention masks (sequence routers).
        stack: which of the context's masks this layer reads (``encoder`` or ``decoder``).
    """

    def __init__(
        self,
        *sources: TensorOrList,
        gate: str = "softmax",
        k: int | None = None,
        granularity: str = "token",
        mode: str = "output",
        activation: str = "relu",
        backend: str = "auto",
        layer_norm: nn.Module | None = None,
        source_names: Sequence[str] | None = None,
        context: RoutingContext | None = None,
        stack: str = "encoder",
    ) -> None:
        super().__init__(*sources, source_names=source_names)
        n, d = self.num_sources, self.hidden_size
        self.k = check_router_options(gate, k, granularity, mode, n)
        if mode == "merge":
            check_equal_ranks(self.packed())
        self.gate, self.granularity, self.mode = gate, granularity, mode
        self.activation = check_activation(activation)
        self.backend = backend
        self.layer_norm = layer_norm
        self.context = context
        self.stack = stack
        self.router = nn.Linear(d, n, device=self.w_down.device, dtype=self.w_down.dtype)
        with torch.no_grad():
            self.router.weight.zero_()
            self.router.bias.zero_()
        self.register_buffer("unit_omega", torch.ones(n, 1, dtype=self.w_down.dtype), persistent=False)

    def _mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        if attention_mask is not None or self.context is None:
            return attention_mask
        return self.context.mask(self.stack)

    def _router_gates(self, z: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The router's gates in z's dtype: ``[..., N]`` per token, or ``[B, N]`` per sequence."""
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            got = getattr(z, "dtype", type(z).__name__)
            raise ValueError(f"z must be a floating-point tensor [..., d]; got {got}")
        if z.shape[-1] != self.hidden_size:
            raise ValueError(f"z has shape {list(z.shape)}: its last dim must be d={self.hidden_size}")
        weight, bias = self.router.weight, self.router.bias
        x = z.to(weight.dtype)
        if self.granularity == "sequence":
            x = masked_mean(x, self._mask(attention_mask))  # [B, d]
        return gates(F.linear(x, weight, bias), self.gate, self.k).to(z.dtype)

    def coefficients(self, z: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The gates ``[..., N]`` for ``z [..., d]`` (a sequence router's gates repeated over each
        sequence's tokens), in z's dtype."""
        g = self._router_gates(z, attention_mask)
        if self.granularity == "sequence":
            return g.unsqueeze(1).expand(*z.shape[:-1], self.num_sources)
        return g

    def compose(
        self,
        z: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        gates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The routed composition of the sources on ``z [..., d]`` plus ``residual``.

        ``gates [..., N]`` (z's leading dims) replaces the router's output when given;
        ``attention_mask [B, L]`` is read by a sequence router (else the context's mask)."""
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"z must be a tensor [..., d]; got {type(z).__name__}")
        packed = self.packed().to(z.dtype)
        if gates is not None:
            check_gates(gates, z, self.num_sources)
            g = gates
        elif self.mode == "merge" and self.granularity == "sequence" and self.backend != "reference":
            g = self._router_gates(z, attention_mask)  # [B, N]: build the B merged adapters
            return merged_adapter_sum_per_sequence(z, packed, g, residual, activation=self.activation)
        else:
            g = self.coefficients(z, attention_mask)
        if self.mode == "merge":
            merge = merged_adapter_sum_reference if self.backend == "reference" else merged_adapter_sum
            return merge(z, packed, g, residual, activation=self.activation)
        omega = self.unit_omega.to(z.dtype)
        return scaled_adapter_sum_packed(
            z, packed, omega, residual, activation=self.activation, backend=self.backend, row_scale=g
        )

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """The full sub-layer ``LN(routed(LN(h + x)) + h + x)``; needs ``layer_norm``."""
        return self.post_ln_sublayer(hidden_states, input_tensor)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (
            f"gate={self.gate!r}{k}, granularity={self.granularity!r}, mode={self.mode!r}, "
            f"num_sources={self.num_sources}, ranks={list(self.ranks)}, hidden_size={self.hidden_size}, "
            f"backend={self.backend!r}"
        )
