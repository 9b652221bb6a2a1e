"""The order providers and model variants are listed in (tables, plots, legends)."""

from __future__ import annotations

PROVIDER_ORDER = ("naive", "reference", "compile", "adapters", "torch", "triton", "auto")
MODEL_ORDER = ("plain", "scalearn_naive", "scalearn_fused", "fusion_adapters", "fusion_fused")
TASK_BANK_ORDER = ("single", "bank", "per_task", "adapters_batchsplit")


def order(kind: str, provider: str) -> tuple[int, str]:
    seq = {"model": MODEL_ORDER, "task_bank": TASK_BANK_ORDER}.get(kind, PROVIDER_ORDER)
    return (seq.index(provider) if provider in seq else len(seq), provider)
