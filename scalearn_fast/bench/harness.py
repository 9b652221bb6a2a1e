"""One benchmark case end to end: build the timed step, warm up (compilation and autotuning
stay out of the timings), measure peak memory once, time with pytest-benchmark's ``pedantic``,
fill ``extra_info`` and print a progress line."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..ops import path_choice
from .device import DeviceRecord, nvml_sample
from .flops import OpCost
from .providers import Provider
from .timing import (
    device_time,
    fill_extra_info,
    peak_memory,
    saved_activation_bytes,
    synced,
    use_device_clock,
)

MODES = ("fwd", "fwdbwd")


def layer_step(p: Provider, z: torch.Tensor, residual: torch.Tensor, mode: str) -> Callable[[], Any]:
    """fwd: inference under no_grad. fwdbwd: forward + backward for z and the trainable
    parameters (ω for ScaLearn, the fusion weights for AdapterFusion), sources frozen."""
    if mode == "fwd":

        def fwd() -> torch.Tensor:
            with torch.no_grad():
                return p.module(z, residual)

        return fwd
    if mode != "fwdbwd":
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    zg = z.detach().clone().requires_grad_(True)
    grad_out = torch.randn_like(z)
    inputs = [zg, *p.trainable]

    def fwdbwd() -> tuple[torch.Tensor, ...]:
        out = p.module(zg, residual)
        return torch.autograd.grad(out, inputs, grad_out)

    return fwdbwd


def rounds_for(estimate_s: float, device: torch.device, quick: bool) -> int:
    """Enough rounds for a stable median within a per-case time budget."""
    budget, lo, hi = (0.3, 2, 5) if quick else ((1.0, 10, 200) if device.type == "cuda" else (2.0, 3, 15))
    if estimate_s <= 0:
        return hi
    return max(lo, min(hi, int(budget / estimate_s)))


def iterations_for(estimate_s: float, round_s: float = 2e-3, most: int = 1000) -> int:
    """Calls per round on a GPU: enough that a round lasts ~``round_s`` (launch gaps and the
    clock's synchronisation amortised), at least one."""
    if estimate_s <= 0:
        return most
    return max(1, min(most, round(round_s / estimate_s)))


def run_case(
    benchmark: Any,
    fn: Callable[[], Any],
    *,
    device: torch.device,
    warmup: int,
    params: dict[str, Any],
    tokens: int,
    cost: OpCost,
    record: DeviceRecord,
    dtype: torch.dtype,
    quick: bool = False,
) -> dict[str, Any]:
    path_choice.clear()  # each case measures its own choices (auto / fused vs two-kernel)
    timed = synced(fn, device)
    for _ in range(max(1, warmup)):
        timed()
    t0 = time.perf_counter()
    timed()
    estimate = time.perf_counter() - t0
    peak, method = peak_memory(fn, device)
    if use_device_clock(benchmark, device):
        iterations = iterations_for(estimate)
        rounds = rounds_for(estimate * iterations, device, quick)
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
        timing = f"{iterations} back-to-back calls per round between device synchronisations"
    else:
        iterations = 1
        rounds = rounds_for(estimate, device, quick)
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
        timing = "one call per round" + (", synchronised" if device.type == "cuda" else "")
    info = fill_extra_info(
        benchmark,
        params=params,
        tokens=tokens,
        cost=cost,
        record=record,
        dtype=dtype,
        peak_bytes=peak,
        peak_method=method,
    )
    extra: dict[str, Any] = {"rounds": rounds, "iterations": iterations, "timing": timing}
    if device.type == "cuda":  # clocks and power under this case's load (the record's are idle)
        extra.update({f"after_{k}": v for k, v in nvml_sample(device.index or 0).items()})
    extra.update(device_time(fn, device))
    if path_choice.choices():  # which implementation each measured choice picked
        extra["path_choices"] = {" ".join(map(str, k)): v for k, v in path_choice.choices().items()}
    info.update(extra)
    benchmark.extra_info.update(extra)
    roof = info["roofline_pct"]
    mem = "n/a" if peak is None else f"{peak / 2**20:.1f} MiB"
    print(
        f"\n[bench] {params.get('kind')}/{params.get('mode')}/{params.get('provider')} {params.get('case')}: "
        f"median {info['median_s'] * 1e3:.3f} ms, {info['tokens_per_s']:.3g} tok/s, "
        f"{info['tflops']:.3g} TFLOP/s, roofline {'n/a' if roof is None else f'{roof:.1f}%'}, "
        f"peak mem {mem} ({rounds} rounds x {iterations})"
        + (f", GPU busy {extra['device_s'] * 1e3:.3f} ms/call" if "device_s" in extra else ""),
        file=sys.stderr,
        flush=True,
    )
    return info


def run_layer_case(
    benchmark: Any,
    kind: str,
    providers: dict[str, Callable[..., Provider]],
    cost_fn: Callable[..., OpCost],
    case: Any,
    provider: str,
    mode: str,
    device: torch.device,
    record: DeviceRecord,
    quick: bool,
) -> dict[str, Any]:
    """One layer-level case (ScaLearn or AdapterFusion): random sources and inputs, the
    provider's step in ``mode``, timed by ``run_case``. A provider that cannot run here skips."""
    import pytest

    from .providers import ProviderUnavailable, make_sources

    c = case
    src = make_sources(c.n, c.d, c.r, dtype=c.dtype, device=device)
    try:
        p = providers[provider](src)
    except ProviderUnavailable as exc:
        pytest.skip(str(exc))
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(c.batch, c.seq, c.d, generator=gen).to(device=device, dtype=c.dtype)
    residual = torch.randn(c.batch, c.seq, c.d, generator=gen).to(device=device, dtype=c.dtype)
    benchmark.group = f"{kind} {mode} {c.id}"
    params = {
        "kind": kind,
        "provider": provider,
        "mode": mode,
        "case": c.id,
        "d": c.d,
        "r": c.r,
        "n": c.n,
        "batch": c.batch,
        "seq": c.seq,
    }
    cost = cost_fn(c.tokens, c.d, c.r, c.n, elem_bytes=z.element_size(), backward=mode == "fwdbwd")
    if mode == "fwdbwd":  # what the provider keeps for its backward (issue 3's memory target)
        zg = z.detach().clone().requires_grad_(True)
        owned = [z, zg, residual, *p.module.parameters(), *p.module.buffers(), *p.trainable]
        params["saved_activation_bytes"] = saved_activation_bytes(lambda: p.module(zg, residual), owned)
    return run_case(
        benchmark,
        layer_step(p, z, residual, mode),
        device=device,
        warmup=p.warmup,
        params=params,
        tokens=c.tokens,
        cost=cost,
        record=record,
        dtype=c.dtype,
        quick=quick,
    )
