"""What ``ScaLearnLayer`` and ``AdapterFusionLayer`` share: N frozen source adapters held in the
packed layout (``ops.packing``), their names, and the checks of a sub-layer ``forward(h, x)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .ops.packing import PackedSources, TensorOrList, pack_sources


def check_sublayer_inputs(
    owner: str, layer_norm: nn.Module | None, hidden_states: torch.Tensor, input_tensor: torch.Tensor
) -> nn.Module:
    """The checks of a sub-layer ``forward(h, x)``: a LayerNorm is set and h, x match."""
    if layer_norm is None:
        raise ValueError(
            f"{owner}.forward needs the layer's output LayerNorm (pass layer_norm=...); "
            "use compose(z, residual) for the composition alone"
        )
    if hidden_states.shape != input_tensor.shape:
        raise ValueError(
            f"hidden_states has shape {list(hidden_states.shape)} but input_tensor has "
            f"{list(input_tensor.shape)}; they must match"
        )
    return layer_norm


class FrozenSources(nn.Module):
    """N bottleneck source adapters, packed and frozen (``requires_grad=False`` Parameters, so they
    follow ``.to()`` and show in the state dict as ``w_down``, ``b_down``, ``w_up``, ``b_up``).

    Args:
        w_down, b_down, w_up, b_up: nn.Linear layout, stacked (``[N, r, d]``, ``[N, r]``,
            ``[N, d, r]``, ``[N, d]``) or per-source lists (ranks may differ).
        source_names: optional names of the N sources, in order (default ``"0"``, ``"1"``, ...).
    """

    w_down: nn.Parameter
    b_down: nn.Parameter
    w_up: nn.Parameter
    b_up: nn.Parameter
    source_index: torch.Tensor

    def __init__(
        self,
        w_down: TensorOrList,
        b_down: TensorOrList,
        w_up: TensorOrList,
        b_up: TensorOrList,
        source_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        packed = pack_sources(w_down, b_down, w_up, b_up)
        for name in ("w_down", "b_down", "w_up", "b_up"):
            value = getattr(packed, name).detach().clone()
            self.register_parameter(name, nn.Parameter(value, requires_grad=False))
        self.register_buffer("source_index", packed.source_index, persistent=False)
        self.ranks = packed.ranks
        n = packed.num_sources
        self.source_names = list(source_names) if source_names is not None else [str(i) for i in range(n)]
        if len(self.source_names) != n:
            raise ValueError(f"source_names holds {len(self.source_names)} names for N={n} sources")

    @property
    def num_sources(self) -> int:
        return len(self.ranks)

    @property
    def hidden_size(self) -> int:
        return self.w_down.shape[1]

    def packed(self) -> PackedSources:
        return PackedSources(self.w_down, self.b_down, self.w_up, self.b_up, self.source_index, self.ranks)
