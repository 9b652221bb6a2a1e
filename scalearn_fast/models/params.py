"""Transfer-parameter counts: what each ScaLearn variant and AdapterFusion train on top of the sources.

With L adapter sites (FFN output sub-layers: encoder layers, plus decoder layers for BART),
hidden size d and N sources (docs/design.md):

    scalearn            L·N·d       scalearn_uniform    L·N
    scalearn++          N·d         scalearn_uniform++  N
    adapter_fusion      L·(3·d² + 2·d)   (query, key with bias; value without)

Task heads are left out (every method trains one).

A bottleneck adapter at every site (stage 1, or one source) holds L·(2·d·r + r + d) parameters;
``adapter_budget`` gives that as a fraction of the model's, ``bottleneck_for_budget`` the
largest r that stays within a budget (translation adapters are sized this way: about 10% of
the model matches full fine-tuning, and quality degrades as the budget shrinks).
"""

from __future__ import annotations

import torch.nn as nn

from ..layers import VARIANTS
from .registry import ffn_sites, hidden_size


def transfer_parameters(num_layers: int, hidden: int, num_sources: int) -> dict[str, int]:
    """``{method: trainable transfer parameters}`` for the four ScaLearn variants and AdapterFusion."""
    if num_layers < 1 or hidden < 1 or num_sources < 1:
        raise ValueError(f"need positive sizes; got L={num_layers}, d={hidden}, N={num_sources}")
    counts = {
        "scalearn": num_layers * num_sources * hidden,
        "scalearn_uniform": num_layers * num_sources,
        "scalearn++": num_sources * hidden,
        "scalearn_uniform++": num_sources,
        "adapter_fusion": num_layers * (3 * hidden * hidden + 2 * hidden),
    }
    assert set(VARIANTS) <= set(counts)
    return counts


def model_transfer_parameters(model: nn.Module, num_sources: int) -> dict[str, int]:
    """``transfer_parameters`` for ``model``'s number of adapter sites and hidden size."""
    return transfer_parameters(len(ffn_sites(model)), hidden_size(model), num_sources)


def source_adapter_parameters(num_layers: int, hidden: int, bottleneck: int) -> int:
    """Parameters of one frozen Pfeiffer source adapter: L·(2·d·r + r + d)."""
    return num_layers * (2 * hidden * bottleneck + bottleneck + hidden)


def adapter_budget(num_layers: int, hidden: int, bottleneck: int, model_parameters: int) -> float:
    """One bottleneck adapter per site as a fraction of ``model_parameters``."""
    if model_parameters < 1:
        raise ValueError(f"model_parameters must be >= 1; got {model_parameters}")
    return source_adapter_parameters(num_layers, hidden, bottleneck) / model_parameters


def bottleneck_for_budget(num_layers: int, hidden: int, model_parameters: int, budget: float) -> int:
    """The largest bottleneck r whose adapter (one per site) holds at most ``budget`` (a fraction,
    e.g. 0.01) of ``model_parameters``; 0 when not even r = 1 fits."""
    if not 0.0 < budget:
        raise ValueError(f"budget must be a fraction > 0; got {budget}")
    if num_layers < 1 or hidden < 1:
        raise ValueError(f"need positive sizes; got L={num_layers}, d={hidden}")
    allowed = budget * model_parameters / num_layers - hidden  # 2·d·r + r <= allowed
    return max(0, int(allowed // (2 * hidden + 1)))
