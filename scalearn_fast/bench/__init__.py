"""Benchmark support for ``pytest bench/`` (docs/benchmarks.md).

``device`` records the machine and its roofline peaks, ``flops`` counts FLOPs and minimum
bytes per op, ``providers`` builds the compared implementations, ``harness`` runs one group
(every provider of a shape and mode) with ``interleave`` timing them in interleaved rounds,
``timing`` measures peak memory and derived metrics, ``stats`` the spread and paired ratios,
``results`` writes the row file, ``progress`` the progress line, and ``report`` (with
``report_md`` and ``report_plots``) turns row files into tables and plots
(``python -m scalearn_fast.bench report RUN/raw.json``).
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
