"""scalearn_fast: many adapters at once, fused.

ScaLearn's composition of N frozen bottleneck adapters as two GEMMs (torch) or
fused Triton kernels, behind autograd-aware ``torch.library`` custom ops.
"""

from .deploy import export
from .formats import load_adapterhub_sources
from .layers import VARIANTS, ScaLearnLayer, init_omega
from .layers_fusion import AdapterFusionLayer
from .layers_router import RouterLayer
from .models import (
    add_task,
    attach_fusion,
    attach_router,
    attach_scalearn,
    attach_task_bank,
    detach_fusion,
    detach_router,
    detach_scalearn,
    detach_task_bank,
    load_router,
    load_scalearn,
    remove_task,
    save_router,
    save_scalearn,
)
from .ops import PackedSources, adapter_fusion, pack_sources, scaled_adapter_sum, scaled_adapter_sum_bank

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "AdapterFusionLayer",
    "PackedSources",
    "RouterLayer",
    "ScaLearnLayer",
    "__version__",
    "adapter_fusion",
    "add_task",
    "attach_fusion",
    "attach_router",
    "attach_scalearn",
    "attach_task_bank",
    "detach_fusion",
    "detach_router",
    "detach_scalearn",
    "detach_task_bank",
    "export",
    "init_omega",
    "load_adapterhub_sources",
    "load_router",
    "load_scalearn",
    "pack_sources",
    "save_router",
    "remove_task",
    "save_scalearn",
    "scaled_adapter_sum",
    "scaled_adapter_sum_bank",
]
