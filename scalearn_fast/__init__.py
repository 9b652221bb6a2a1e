"""scalearn_fast: many adapters at once, fused.

ScaLearn's composition of N frozen bottleneck adapters as two GEMMs (torch) or
fused Triton kernels, behind autograd-aware ``torch.library`` custom ops.
"""

from .ops import PackedSources, pack_sources, scaled_adapter_sum

__version__ = "0.1.0"

__all__ = ["PackedSources", "pack_sources", "scaled_adapter_sum", "__version__"]
