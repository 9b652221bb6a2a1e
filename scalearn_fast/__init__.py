"""scalearn_fast: many adapters at once, fused.

ScaLearn's composition of N frozen bottleneck adapters as two GEMMs (torch) or
fused Triton kernels, behind autograd-aware ``torch.library`` custom ops.
"""

from .deploy import export
from .formats import load_adapterhub_sources
from .layers import VARIANTS, ScaLearnLayer, init_omega
from .layers_fusion import AdapterFusionLayer
from .layers_lora_mixture import LoRAMixture
from .layers_router import RouterLayer
from .models import (
    accelerate,
    accelerated,
    add_task,
    attach_fusion,
    attach_lora_mixture,
    attach_router,
    attach_scalearn,
    attach_task_bank,
    deaccelerate,
    detach_fusion,
    detach_lora_mixture,
    detach_router,
    detach_scalearn,
    detach_task_bank,
    load_router,
    load_scalearn,
    lora_mixture_loss,
    remove_task,
    save_router,
    save_scalearn,
    set_lora_mixture_gates,
)
from .ops import PackedSources, adapter_fusion, pack_sources, scaled_adapter_sum, scaled_adapter_sum_bank
from .ops.lora_mixture import lora_mixture

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "AdapterFusionLayer",
    "LoRAMixture",
    "PackedSources",
    "RouterLayer",
    "ScaLearnLayer",
    "__version__",
    "accelerate",
    "accelerated",
    "adapter_fusion",
    "add_task",
    "attach_fusion",
    "attach_lora_mixture",
    "attach_router",
    "attach_scalearn",
    "attach_task_bank",
    "deaccelerate",
    "detach_fusion",
    "detach_lora_mixture",
    "detach_router",
    "detach_scalearn",
    "detach_task_bank",
    "export",
    "init_omega",
    "load_adapterhub_sources",
    "load_router",
    "load_scalearn",
    "lora_mixture",
    "lora_mixture_loss",
    "pack_sources",
    "save_router",
    "remove_task",
    "save_scalearn",
    "set_lora_mixture_gates",
    "scaled_adapter_sum",
    "scaled_adapter_sum_bank",
]
