"""Stage 1: one trainable Pfeiffer (SeqBn) bottleneck adapter after every FFN output sub-layer.

The module's parameter names (``adapter_down.0``, ``adapter_up``) and init (weights N(0, 0.02),
zero biases: ``init_weights="bert"``) follow the ``adapters`` library, so the trained adapter is
written in its format and computes the same function there:
``LN(A(LN(h + x)) + h + x)`` with ``A(z) = W_up relu(W_down z + b_down) + b_up``; at a pre-LN
site (mBART, T5, ...) ``A(h + x) + h + x``, as the library computes there.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..io import AdapterWeights, adapter_key_prefix, save_adapterhub_adapter
from ..models.patching import LayerNormRef, patch_site, unpatch_site
from ..models.registry import ffn_sites, hidden_size, model_type

ATTR = "bottleneck_adapter"


class BottleneckAdapter(nn.Module):
    """``A(z) = W_up relu(W_down z + b_down) + b_up`` with the library's parameter names."""

    def __init__(self, hidden: int, bottleneck: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.adapter_down = nn.Sequential(nn.Linear(hidden, bottleneck), nn.ReLU())
        self.adapter_up = nn.Linear(bottleneck, hidden)
        with torch.no_grad():
            for linear in (self.adapter_down[0], self.adapter_up):
                linear.weight.normal_(0.0, 0.02, generator=generator)
                linear.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.adapter_down(z))

    def weights(self) -> AdapterWeights:
        down = self.adapter_down[0]
        return AdapterWeights(down.weight, down.bias, self.adapter_up.weight, self.adapter_up.bias)


class AdapterSublayer(nn.Module):
    """The FFN output sub-layer with one adapter: ``LN(A(LN(h + x)) + h + x)``, or
    ``A(h + x) + h + x`` without a LayerNorm (``layer_norm=None``: a pre-LN site)."""

    def __init__(self, adapter: BottleneckAdapter, layer_norm: nn.Module | None) -> None:
        super().__init__()
        self.adapter = adapter
        self._ln = None if layer_norm is None else LayerNormRef(layer_norm)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.forward_summed(h + x)

    def forward_summed(self, s: torch.Tensor) -> torch.Tensor:
        """The sub-layer given ``s = h + x`` (sites that see only the sum; see ``models/patching``)."""
        if self._ln is None:
            return self.adapter(s) + s
        return self._ln(self.adapter(self._ln(s)) + s)


def bottleneck_size(hidden: int, reduction_factor: float) -> int:
    """``hidden // reduction_factor``, refusing factors that leave no bottleneck or make no sense."""
    rf = reduction_factor
    if not (isinstance(rf, int | float) and math.isfinite(rf) and rf > 0):
        raise ValueError(f"reduction_factor (--reduction-factor) must be a finite number > 0; got {rf}")
    bottleneck = int(hidden // reduction_factor)
    if bottleneck < 1:
        raise ValueError(
            f"reduction_factor (--reduction-factor) {reduction_factor} leaves no bottleneck for hidden size "
            f"{hidden} (hidden // reduction_factor = 0); it must be at most {hidden}"
        )
    return bottleneck


def attach_bottleneck_adapters(
    model: nn.Module, reduction_factor: float = 16, *, seed: int | None = None
) -> list[BottleneckAdapter]:
    """Insert a fresh adapter at every registry site (bottleneck ``d // reduction_factor``)."""
    d = hidden_size(model)
    bottleneck = bottleneck_size(d, reduction_factor)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    param = next(model.parameters())
    adapters = []
    for site in ffn_sites(model):
        adapter = BottleneckAdapter(d, bottleneck, generator).to(device=param.device, dtype=param.dtype)
        patch_site(site, AdapterSublayer(adapter, None if site.pre_ln else site.layer_norm), ATTR)
        adapters.append(adapter)
    return adapters


def detach_bottleneck_adapters(model: nn.Module) -> None:
    for site in ffn_sites(model):
        if hasattr(site.module, ATTR):
            unpatch_site(site, ATTR)


def save_bottleneck_adapters(
    model: nn.Module, folder, name: str, reduction_factor: float, *, safetensors: bool = False
):
    """Write the attached adapters in AdapterHub format (loads in ``adapters`` and here)."""
    layers = {}
    for site in ffn_sites(model):
        sub = getattr(site.module, ATTR)
        layers[adapter_key_prefix(site.name, site.style)] = sub.adapter.weights()
    return save_adapterhub_adapter(
        folder,
        name,
        layers,
        model_type=model_type(model),
        hidden_size=hidden_size(model),
        reduction_factor=reduction_factor,
        model_class=type(model).__name__,
        model_name=getattr(model.config, "_name_or_path", "") or "",
        safetensors=safetensors,
    )
