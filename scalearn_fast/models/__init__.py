"""Hugging Face models: the FFN-site registry, per-instance patching, ScaLearn, AdapterFusion,
router and task-bank attach/detach, ScaLearn and router checkpoints."""

from .checkpoint import load_scalearn, save_scalearn
from .fusion import attach_fusion, detach_fusion
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
    "attach_router",
    "attach_scalearn",
    "attach_state",
    "detach_fusion",
    "detach_router",
    "detach_scalearn",
    "ffn_output_modules",
    "ffn_sites",
    "head_parameters",
    "is_attached",
    "is_patched",
    "load_router",
    "load_scalearn",
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
    "site_key",
    "source_adapter_parameters",
    "transfer_parameters",
    "unpatch",
    "unpatch_site",
]
