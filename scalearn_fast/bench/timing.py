"""Synchronisation, peak memory, saved activations, GPU-busy time and the derived metrics
(tokens/s, TFLOP/s, GB/s, % roofline) every benchmark row carries. The rounds themselves are
timed by ``interleave``.

GPU: peak memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the
call. ``use_device_clock`` makes a pytest-benchmark fixture synchronise around its rounds, for
code that times with pytest-benchmark directly.

CPU: peak memory is the process RSS high-water mark above the RSS before the call, after
resetting the mark (``/proc/self/clear_refs``, Linux). So that freed tensors give their pages
back instead of staying in glibc's heap, ``cpu_memory_setup`` fixes glibc's mmap threshold at
128 KiB (``mallopt``); the figure is then close to the torch tensors' own peak (plus small allocator noise).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .device import DeviceRecord
from .flops import OpCost

_M_MMAP_THRESHOLD = -3


def cpu_memory_setup(threshold: int = 128 * 1024) -> bool:
    """Pin glibc's mmap threshold so large frees unmap (RSS tracks live tensors)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))
    except OSError:
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation: what pytest-benchmark times."""
    if device.type != "cuda":
        return fn

    def call() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def use_device_clock(benchmark: Any, device: torch.device) -> bool:
    """Make ``benchmark`` read ``synchronize(); perf_counter()`` as its clock on CUDA.

    pytest-benchmark times a round as ``timer(); K calls; timer()`` and binds its timer when it
    builds each round's runner, so setting it here covers the rounds that follow. It has no public
    per-test setter (only ``--benchmark-timer``, for the whole session), hence the attribute;
    returns False (the caller then syncs inside every call) if a release renames it.
    """
    if device.type != "cuda" or not hasattr(benchmark, "_timer"):
        return False

    def cuda_clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    benchmark._timer = cuda_clock
    return True


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, str]:
    """(peak bytes above the pre-call level during one ``fn()``, how it was measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak), "torch.cuda.max_memory_allocated"
    if not _reset_rss_peak():
        return None, "unavailable (no /proc/self/clear_refs)"
    base = _proc_status("VmRSS")
    out = fn()
    hwm = _proc_status("VmHWM")
    del out
    if base is None or hwm is None:
        return None, "unavailable (no /proc/self/status)"
    return max(0, hwm - base), "rss_high_water_delta"


def saved_activation_bytes(forward: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> int | None:
    """Bytes autograd keeps for the backward after one ``forward()``: the distinct storages its
    saved-tensor hooks see, minus those of ``exclude`` (inputs, parameters, buffers: they exist
    whether or not anything is saved). Device-independent and exact, unlike a peak; None when
    the forward cannot run under saved-tensor hooks."""
    known = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
    except Exception:  # noqa: BLE001  (e.g. a compiled graph that rejects the hooks)
        return None
    del out
    return sum(saved.values())


def kernel_totals(events: Any, calls: int) -> tuple[float, float]:
    """(device seconds, kernel/memcpy launches) per call from profiler ``key_averages()``:
    every event that ran on the GPU, its self time summed."""
    device_us, launches = 0.0, 0
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        device_us += float(us if us is not None else e.self_cuda_time_total)
        launches += e.count
    return device_us / 1e6 / calls, launches / calls


def device_time(fn: Callable[[], Any], device: torch.device, calls: int = 5) -> dict[str, Any]:
    """What the GPU itself spends per call (kernel time, launches), from a torch.profiler trace
    of ``calls`` back-to-back calls; the timed median minus this is host time the GPU waited
    for. Empty off CUDA or with ``SCALEARN_BENCH_DEVICE_TIME=0`` (a trace per case costs a
    little time), or with the reason when the profiler cannot trace here."""
    if device.type != "cuda" or os.environ.get("SCALEARN_BENCH_DEVICE_TIME", "1") == "0":
        return {}
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize(device)
        seconds, launches = kernel_totals(prof.key_averages(), calls)
    except Exception as exc:  # noqa: BLE001  (CUPTI missing or busy: the timing still stands)
        return {"device_time_error": f"{type(exc).__name__}: {exc}"[:200]}
    if launches == 0:
        return {"device_time_error": "the profiler saw no GPU activity"}
    return {"device_s": seconds, "kernels_per_call": launches}


def derived_metrics(
    median_s: float, tokens: int, cost: OpCost, record: DeviceRecord, dtype: torch.dtype
) -> dict[str, float | None]:
    """tokens/s, TFLOP/s, GB/s and % of the roofline bound max(FLOPs/peak, bytes/bandwidth)."""
    roof = cost.roofline_time(record.peak_for(dtype), record.peak_bw_tbps)
    return {
        "median_s": median_s,
        "tokens_per_s": tokens / median_s if median_s > 0 else None,
        "tflops": cost.flops / median_s / 1e12 if median_s > 0 else None,
        "gbps": cost.min_bytes / median_s / 1e9 if median_s > 0 else None,
        "roofline_s": roof or None,
        "roofline_pct": 100.0 * roof / median_s if roof and median_s > 0 else None,
        "flops": cost.flops,
        "min_bytes": cost.min_bytes,
        "intensity": cost.intensity,
    }
