"""Benchmark support for ``pytest bench/ --benchmark-only`` (DESIGN.md §5).

``device`` records the machine and its roofline peaks, ``flops`` counts FLOPs and minimum
bytes per op, ``providers`` builds the compared implementations, ``timing`` measures peak
memory and fills pytest-benchmark's ``extra_info``, ``report`` turns the JSON into tables and
plots (``python -m scalearn_fast.bench report <json...>``).
"""

from .device import DeviceRecord, device_record, device_slug
from .flops import OpCost, fusion_cost, model_cost, scalearn_cost

__all__ = [
    "DeviceRecord",
    "OpCost",
    "device_record",
    "device_slug",
    "fusion_cost",
    "model_cost",
    "scalearn_cost",
]
