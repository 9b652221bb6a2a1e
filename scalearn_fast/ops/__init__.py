"""Ops: the composition functional, its backends and input packing."""

from .fusion import adapter_fusion, adapter_fusion_packed
from .packing import PackedSources, pack_sources
from .scaled_adapter_sum import (
    scaled_adapter_sum,
    scaled_adapter_sum_folded,
    scaled_adapter_sum_packed,
)
from .scaled_adapter_sum_bank import scaled_adapter_sum_bank, scaled_adapter_sum_bank_packed

__all__ = [
    "PackedSources",
    "adapter_fusion",
    "adapter_fusion_packed",
    "pack_sources",
    "scaled_adapter_sum",
    "scaled_adapter_sum_bank",
    "scaled_adapter_sum_bank_packed",
    "scaled_adapter_sum_folded",
    "scaled_adapter_sum_packed",
]
