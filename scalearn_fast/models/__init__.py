"""Hugging Face models: the FFN-site registry, per-instance patching, ScaLearn, AdapterFusion,
router and task-bank attach/detach, ScaLearn and router checkpoints."""

from .accelerate import accelerate, accelerated, deaccelerate
from .checkpoint import load_scalearn, save_scalearn
from .fusion import attach_fusion, detach_fusion
from .fusion_save import save_fusion
from .lora_mixture import (
    attach_lora_mixture,
    detach_lora_mixture,
    lora_mixture_layers,
    lora_mixture_loss,
    lora_mixture_parameters,
    set_lora_mixture_gates,
)
from .params import model_transfer_parameters, source_adapter_parameters, transfer_parameters
from .patching import is_patched, original_forward, patch_forward, patch_site, unpatch, unpatch_site
from .registry import REGISTRY, FFNSite, ffn_output_modules, ffn_sites, site_key
from .router import attach_router, detach_router, router_layers, router_parameters
from .router_checkpoint import load_router, save_router
from .scalearn import (
    attach_scalearn,
    attach_state,
    detach_scalearn,
    head_parameters,
    is_attached,
    omega_parameters,
    scalearn_layers,
)
from .task_bank import (
    add_task,
    attach_task_bank,
    detach_task_bank,
    num_labels,
    remove_task,
    task_bank_layers,
    task_bank_parameters,
    task_ids,
    task_names,
    task_state,
)

__all__ = [
    "REGISTRY",
    "FFNSite",
    "accelerate",
    "accelerated",
    "deaccelerate",
    "save_fusion",
    "add_task",
    "attach_task_bank",
    "detach_task_bank",
    "num_labels",
    "remove_task",
    "task_bank_layers",
    "task_bank_parameters",
    "task_ids",
    "task_names",
    "task_state",
    "attach_fusion",
    "attach_lora_mixture",
    "attach_router",
    "attach_scalearn",
    "attach_state",
    "detach_fusion",
    "detach_lora_mixture",
    "detach_router",
    "detach_scalearn",
    "ffn_output_modules",
    "ffn_sites",
    "head_parameters",
    "is_attached",
    "is_patched",
    "load_router",
    "load_scalearn",
    "lora_mixture_layers",
    "lora_mixture_loss",
    "lora_mixture_parameters",
    "model_transfer_parameters",
    "omega_parameters",
    "original_forward",
    "patch_forward",
    "patch_site",
    "router_layers",
    "router_parameters",
    "save_router",
    "save_scalearn",
    "scalearn_layers",
    "set_lora_mixture_gates",
    "site_key",
    "source_adapter_parameters",
    "transfer_parameters",
    "unpatch",
    "unpatch_site",
]
