"""The device record stored with every result, and the peaks its roofline uses.

GPU: name, driver, clocks, power and temperature from nvidia-ml-py (``pynvml``) when it
is installed, and peak FLOP/s and HBM bandwidth from a datasheet table (``GPU_PEAKS``).
CPU: model name, cores, threads, and a *measured* peak (one large fp32 GEMM and one large
copy, timed here), labelled ``peak_source="measured"``: a CPU has no datasheet number that
the suite could trust, so the roofline on CPU is relative to what this machine achieved.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# Dense tensor-core peaks (no sparsity), TFLOP/s, and HBM bandwidth, TB/s.
# datasheet: NVIDIA H100/H200 SXM product briefs; "measured" is what a large bf16 GEMM
# typically sustains on an H100 SXM (~790-800 TFLOP/s), kept for reference only.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H100 SXM": {
        "bf16": 989.0,
        "fp16": 989.0,
        "fp32": 67.0,
        "tf32": 494.0,
        "bw": 3.35,
        "bf16_measured": 795.0,
    },
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0, "tf32": 378.0, "bw": 2.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0, "tf32": 418.0, "bw": 3.9},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tf32": 494.0, "bw": 4.8, "bf16_measured": 795.0},
}


@dataclass
class DeviceRecord:
    """What ran the benchmark; stored in every result's ``extra_info['device']``."""

    kind: str  # "cuda" | "cpu"
    name: str
    peak_tflops: dict[str, float]  # per dtype name
    peak_bw_tbps: float
    peak_source: str  # "datasheet:<entry>" | "measured" | "unknown"
    details: dict[str, Any] = field(default_factory=dict)

    def peak_for(self, dtype: torch.dtype) -> float:
        """Peak TFLOP/s for ``dtype`` (0 when unknown)."""
        key = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, "fp32")
        return self.peak_tflops.get(key, 0.0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_slug(record: DeviceRecord | dict) -> str:
    """A file-name-safe device name, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2c``."""
    rec = record if isinstance(record, dict) else record.as_dict()
    name = rec["name"]
    if rec["kind"] == "cpu":
        name = f"cpu {name} {rec.get('details', {}).get('cores', '')}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _gpu_table_entry(name: str) -> str | None:
    upper = name.upper()
    if "H200" in upper:
        return "H200"
    if "H100" in upper:
        if "PCIE" in upper:
            return "H100 PCIe"
        if "NVL" in upper:
            return "H100 NVL"
        return "H100 SXM"
    return None


def _nvml_details(index: int) -> dict[str, Any]:
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        clk = pynvml.NVML_CLOCK_SM
        mem = pynvml.NVML_CLOCK_MEM
        out: dict[str, Any] = {
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, clk),
            "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, clk),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, mem),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
        }
        pynvml.nvmlShutdown()
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in out.items()}
    except Exception as exc:  # NVML missing in a container: keep the run going, say why
        return {"nvml": f"unavailable: {exc}"}


def nvml_sample(index: int) -> dict[str, Any]:
    """SM clock, power and temperature now (the harness calls it right after a case's timed
    rounds, so the figures describe the GPU under that load, not idle); ``{}`` without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            return {
                "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            }
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML (CPU machine, container): the record says so once
        return {}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time_best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=1)
def measure_cpu_peaks(n: int = 2048, copy_mb: int = 256) -> tuple[float, float]:
    """(fp32 GEMM TFLOP/s, copy TB/s) this CPU sustains now: best of several runs. On a shared
    machine the figure is only as good as the quietest of those runs."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    t_gemm = _time_best(lambda: a @ b, 10)
    src = torch.empty(copy_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_copy = _time_best(lambda: dst.copy_(src), 5)
    return 2 * n**3 / t_gemm / 1e12, 2 * src.numel() * 4 / t_copy / 1e12


@functools.lru_cache(maxsize=4)
def _device_record(kind: str, index: int) -> DeviceRecord:
    if kind == "cuda":
        props = torch.cuda.get_device_properties(index)
        entry = _gpu_table_entry(props.name)
        details: dict[str, Any] = {
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            **_nvml_details(index),
        }
        if entry is None:
            return DeviceRecord("cuda", props.name, {}, 0.0, "unknown", details)
        peaks = GPU_PEAKS[entry]
        tflops = {k: v for k, v in peaks.items() if k != "bw"}
        return DeviceRecord("cuda", props.name, tflops, peaks["bw"], f"datasheet:{entry}", details)
    tflops, bw = measure_cpu_peaks()
    details = {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "note": "peaks measured here (best fp32 GEMM 2048^3, 256 MiB copy), not a datasheet",
    }
    return DeviceRecord("cpu", _cpu_model(), {"fp32": tflops}, bw, "measured", details)


def device_record(device: torch.device | str | None = None) -> DeviceRecord:
    """The record for ``device`` (default: CUDA when present, else CPU); cached per device."""
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return _device_record("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    return _device_record("cpu", 0)


def current_slug(device: torch.device | str | None = None) -> str:
    """The ``device_slug`` of this machine's benchmark device without measuring its peaks
    (what scripts name a run folder by before the run)."""
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return device_slug({"kind": "cuda", "name": torch.cuda.get_device_name(dev)})
    return device_slug({"kind": "cpu", "name": _cpu_model(), "details": {"cores": os.cpu_count()}})
