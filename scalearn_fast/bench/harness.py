"""One benchmark group end to end: every provider of one (kind, mode, shape) built, warmed up
(compilation, autotuning and measured path choices stay out of the timings), its peak memory
measured once, then all of them timed in interleaved rounds (``interleave``), and one row per
provider written with its per-round times, spread and derived metrics.

A provider that cannot run here (``ProviderUnavailable``) is recorded as skipped with the
reason; one that raises while building or warming up is recorded as failed and fails the
test after the others' rows are written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops import path_choice
from .device import DeviceRecord, nvml_sample
from .flops import OpCost
from .interleave import iterations_for, policy_for, spread, time_interleaved
from .providers import Provider, ProviderUnavailable
from .results import ResultWriter
from .stats import summarize
from .timing import derived_metrics, device_time, peak_memory, saved_activation_bytes, synced

__all__ = [
    "MODES",
    "Candidate",
    "GroupRun",
    "StepInfo",
    "info_candidate",
    "iterations_for",
    "layer_step",
    "run_case_group",
    "run_group",
    "run_layer_case",
]

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


@dataclass
class Candidate:
    """One provider of a group: a builder returning (the timed step, its warm-up calls), and
    fields its row adds (e.g. how a model variant was attached)."""

    name: str
    build: Callable[[], tuple[Callable[[], Any], int]]
    params: dict[str, Any] = field(default_factory=dict)
    extra: Callable[[], dict[str, Any]] | None = None  # more fields, computed after warm-up


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_group(
    writer: ResultWriter,
    candidates: list[Candidate],
    *,
    params: dict[str, Any],
    tokens: int,
    cost: OpCost | Callable[[str], OpCost],
    record: DeviceRecord,
    dtype: torch.dtype,
    device: torch.device,
    quick: bool = False,
) -> dict[str, dict[str, Any]]:
    """Build, warm up and time ``candidates`` interleaved; write one row each. Returns the rows
    by provider. ``params`` (kind, mode, case, shape) is common to every row; ``cost`` is the
    op's nominal cost, or a function of the provider's name when providers differ in it."""
    where = {k: params.get(k) for k in ("kind", "mode", "case")}
    group_id = f"{where['kind']}/{where['mode']}/{where['case']}@{time.time():.3f}"
    path_choice.clear()  # this group measures its own choices (auto / fused vs two-kernel)
    steps: dict[str, Callable[[], Any]] = {}
    warm: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for c in candidates:
        before = set(path_choice.choices())
        try:
            fn, warmup = c.build()
            timed = synced(fn, device)
            for _ in range(max(1, warmup)):
                timed()
            t0 = time.perf_counter()
            timed()
            estimate = time.perf_counter() - t0
            peak, method = peak_memory(fn, device)
            more = c.extra() if c.extra else {}
        except ProviderUnavailable as exc:
            writer.skip(str(exc), **where, provider=c.name)
            _log(f"[bench] {where['kind']}/{where['mode']}/{c.name} {where['case']}: skipped ({exc})")
            continue
        except Exception as exc:  # noqa: BLE001  (the other providers still run; the test fails below)
            reason = f"failed: {type(exc).__name__}: {exc}"[:300]
            writer.skip(reason, **where, provider=c.name)
            failed.append(f"{c.name}: {reason}")
            _log(f"[bench] {where['kind']}/{where['mode']}/{c.name} {where['case']}: {reason}")
            continue
        chosen = {k: v for k, v in path_choice.choices().items() if k not in before}
        steps[c.name] = fn
        warm[c.name] = {"estimate": estimate, "peak": peak, "method": method, "chosen": chosen, "more": more}
    if not steps:
        if failed:
            raise AssertionError("every provider failed: " + "; ".join(failed))
        return {}
    cuda = device.type == "cuda"
    iterations = {n: iterations_for(w["estimate"]) if cuda else 1 for n, w in warm.items()}
    estimates = {n: w["estimate"] for n, w in warm.items()}
    policy = policy_for(device, quick, len(steps))
    for name, fn in steps.items():  # GPU: one untimed round each, as the timed ones will run
        for _ in range(iterations[name] if cuda else 0):
            fn()
    times = time_interleaved(steps, iterations, estimates, device, policy)
    after = {f"after_{k}": v for k, v in nvml_sample(device.index or 0).items()} if cuda else {}
    rows: dict[str, dict[str, Any]] = {}
    cand = {c.name: c for c in candidates}
    for name, fn in steps.items():
        w = warm[name]
        stats = summarize(times[name], iterations[name])
        info: dict[str, Any] = {**params, "provider": name, **cand[name].params, **w["more"]}
        info["dtype"] = str(dtype).removeprefix("torch.")
        info["tokens"] = tokens
        row_cost = cost(name) if callable(cost) else cost
        info.update(derived_metrics(stats["median"], tokens, row_cost, record, dtype))
        info["peak_mem_bytes"] = w["peak"]
        info["peak_mem_method"] = w["method"]
        info["device"] = record.as_dict()
        info["rounds"] = stats["rounds"]
        info["iterations"] = iterations[name]
        info["round_s"] = times[name]
        info["interleaved"] = group_id
        info["timing"] = (
            f"{iterations[name]} back-to-back calls per round between device synchronisations"
            if cuda
            else "one call per round"
        ) + f"; rounds interleaved with {len(steps) - 1} other provider(s)"
        info.update(after)
        info.update(device_time(fn, device))
        if w["chosen"]:  # which implementation each measured choice picked
            info["path_choices"] = {" ".join(map(str, k)): v for k, v in w["chosen"].items()}
        row_name = f"test_{where['kind']}[{where['case']}-{name}-{where['mode']}]"
        writer.add(row_name, where["kind"], stats, info)
        rows[name] = info
        _log_row(info, stats)
    if failed:
        raise AssertionError("providers failed (the others' rows are written): " + "; ".join(failed))
    return rows


def _log_row(info: dict[str, Any], stats: dict[str, Any]) -> None:
    roof = info.get("roofline_pct")
    peak = info.get("peak_mem_bytes")
    rel = spread(info["round_s"])
    _log(
        f"[bench] {info['kind']}/{info['mode']}/{info['provider']} {info['case']}: "
        f"median {stats['median'] * 1e3:.3f} ms (IQR {100 * rel:.1f}%{', noisy' if rel > 0.1 else ''}), "
        f"{info['tokens_per_s']:.3g} tok/s, {info['tflops']:.3g} TFLOP/s, "
        f"roofline {'n/a' if roof is None else f'{roof:.1f}%'}, "
        f"peak mem {'n/a' if peak is None else f'{peak / 2**20:.1f} MiB'} "
        f"({stats['rounds']} rounds x {info['iterations']})"
        + (f", GPU busy {info['device_s'] * 1e3:.3f} ms/call" if "device_s" in info else "")
    )


def _no_skip(name: str) -> str | None:
    return None


@dataclass(frozen=True)
class GroupRun:
    """What every group of a benchmark run is timed and recorded with: the ``writer`` its rows go
    to, the ``device`` and its ``record``, ``quick`` (fewer rounds: a smoke run) and ``skip``,
    which gives a reason to leave a provider (by name) out of the group, or None."""

    writer: ResultWriter
    device: torch.device
    record: DeviceRecord
    quick: bool = False
    skip: Callable[[str], str | None] = _no_skip


StepInfo = tuple[Callable[[], Any], dict[str, Any]]  # a timed step and the fields its row adds


def info_candidate(name: str, build: Callable[[], StepInfo]) -> Candidate:
    """A provider whose ``build()`` returns its timed step (warmed up twice) and the fields its
    row adds (e.g. how a model variant was attached)."""
    info: dict[str, Any] = {}

    def built() -> tuple[Callable[[], Any], int]:
        step, more = build()
        info.update(more)
        return step, 2

    return Candidate(name, built, extra=lambda: dict(info))


def run_layer_case(
    run: GroupRun,
    kind: str,
    providers: dict[str, Callable[..., Provider]],
    cost_fn: Callable[..., OpCost],
    case: Any,
    mode: str,
) -> dict[str, dict[str, Any]]:
    """One layer-level group (ScaLearn, AdapterFusion, routed): random sources and inputs, every
    provider's step in ``mode``."""
    from .providers import make_sources

    c = case
    src = make_sources(c.n, c.d, c.r, dtype=c.dtype, device=run.device)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(c.batch, c.seq, c.d, generator=gen).to(device=run.device, dtype=c.dtype)
    residual = torch.randn(c.batch, c.seq, c.d, generator=gen).to(device=run.device, dtype=c.dtype)
    params = {"kind": kind, "mode": mode, "case": c.id, "d": c.d, "r": c.r, "n": c.n, "batch": c.batch}
    params["seq"] = c.seq
    cost = cost_fn(c.tokens, c.d, c.r, c.n, elem_bytes=z.element_size(), backward=mode == "fwdbwd")

    def candidate(name: str) -> Candidate:
        holder: dict[str, Provider] = {}

        def build() -> tuple[Callable[[], Any], int]:
            holder["p"] = p = providers[name](src)
            return layer_step(p, z, residual, mode), p.warmup

        def saved() -> dict[str, Any]:
            if mode != "fwdbwd":
                return {}
            p = holder["p"]  # what the provider keeps for its backward (the memory target)
            zg = z.detach().clone().requires_grad_(True)
            owned = [z, zg, residual, *p.module.parameters(), *p.module.buffers(), *p.trainable]
            return {"saved_activation_bytes": saved_activation_bytes(lambda: p.module(zg, residual), owned)}

        return Candidate(name, build, extra=saved)

    return run_case_group(run, c, list(providers), candidate, params=params, cost=cost)


def run_case_group(
    run: GroupRun,
    case: Any,
    names: list[str],
    candidate: Callable[[str], Candidate],
    *,
    params: dict[str, Any],
    cost: OpCost | Callable[[str], OpCost],
) -> dict[str, dict[str, Any]]:
    """``run_group`` over one ``case`` (with ``tokens``, ``dtype`` and ``id``): ``candidate(name)``
    for every name that ``run.skip(name)`` gives no reason to leave out (a skip row says why)."""
    candidates = []
    for name in names:
        reason = run.skip(name)
        if reason:
            run.writer.skip(reason, kind=params["kind"], mode=params["mode"], case=case.id, provider=name)
            continue
        candidates.append(candidate(name))
    return run_group(
        run.writer,
        candidates,
        params=params,
        tokens=case.tokens,
        cost=cost,
        record=run.record,
        dtype=case.dtype,
        device=run.device,
        quick=run.quick,
    )
