"""The report's markdown: headline, per-kind tables with spread and intervals, model overheads
with noise flags, measured path choices, what did not run."""

from __future__ import annotations

import datetime as _dt
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from .matrix import DEFAULT_SHAPE as DEFAULT
from .report_order import order
from .stats import NOISY_SPREAD


def _fmt(v: Any, spec: str = ".3g", none: str = "–", suffix: str = "") -> str:
    if v is None:
        return none
    return format(v, spec) + suffix


def _ms(seconds: Any, spec: str) -> str:
    return "–" if seconds is None else format(seconds * 1e3, spec)


def _mib(v: Any) -> str:
    return "–" if v is None else f"{v / 2**20:.1f}"


def _saved(r: dict[str, Any]) -> str:
    """Saved-for-backward MiB, with the share of the naive loop's when known."""
    ratio = r.get("saved_vs_naive")
    share = "" if ratio is None else f" ({100 * ratio:.1f}%)"
    return _mib(r.get("saved_activation_bytes")) + share


def _spread(r: dict[str, Any]) -> str:
    """``IQR ms (IQR/median %)``, with ``noisy`` above the threshold; – when unknown."""
    pct = r.get("spread_pct")
    if pct is None:
        return "–"
    iqr = r.get("iqr_s")
    if iqr is None and r.get("q1_s") is not None and r.get("q3_s") is not None:
        iqr = r["q3_s"] - r["q1_s"]
    head = "" if iqr is None else f"{iqr * 1e3:.3g} "
    return f"{head}({pct:.1f}%{', noisy' if r.get('noisy') else ''})"


def _pct_spread(r: dict[str, Any]) -> str:
    pct = r.get("spread_pct")
    if pct is None:
        return "–"
    return f"{pct:.1f}%" + (" noisy" if r.get("noisy") else "")


def _times(r: dict[str, Any], baseline: str) -> str:
    """The row's speedup over ``baseline`` (``naive``, ``compile``): ``10.00x`` or
    ``10.00x [9.80–10.20]`` with its interval."""
    v, interval = r.get(f"speedup_vs_{baseline}"), r.get(f"speedup_vs_{baseline}_interval")
    if v is None:
        return "–"
    text = f"{v:.2f}x"
    if interval:
        text += f" [{interval[0]:.2f}–{interval[1]:.2f}]"
    return text


def _overhead(r: dict[str, Any]) -> str:
    pct = r.get("overhead_pct")
    if pct is None:
        return "–"
    text = f"{pct:+.1f}%"
    interval = r.get("overhead_interval_pct")
    if interval:
        text += f" [{interval[0]:+.1f}…{interval[1]:+.1f}]"
    if r.get("overhead_flag"):
        text += f" ({r['overhead_flag']})"
    return text


def _is_default(r: dict[str, Any]) -> bool:
    return r.get("d") == DEFAULT["d"] and r.get("n") == DEFAULT["n"] and r.get("tokens") == DEFAULT["tokens"]


def _table(
    rows: list[dict[str, Any]], kind: str, head: str, cells: Callable[[dict[str, Any]], list[Any]]
) -> list[str]:
    """A markdown table: ``head``, its rule, and ``cells(r)`` for every row of ``kind``."""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines += ["| " + " | ".join(map(str, cells(r))) + " |" for r in rows if r["kind"] == kind]
    return lines


def layer_table(rows: list[dict[str, Any]], kind: str) -> list[str]:
    head = (
        "| mode | shape | provider | median ms | IQR ms (spread) | GPU busy ms | tokens/s | TFLOP/s | GB/s "
        "| % roofline | peak MiB | saved MiB | vs naive | vs compile |"
    )
    return _table(rows, kind, head, lambda r: [
        r["mode"], r["case"], r["provider"], f"{r['median_s'] * 1e3:.3f}", _spread(r),
        _ms(r.get("device_s"), ".3f"), _fmt(r.get("tokens_per_s")),
        _fmt(r.get("tflops")), _fmt(r.get("gbps")),
        _fmt(r.get("roofline_pct"), ".1f"), _mib(r.get("peak_mem_bytes")),
        _mib(r.get("saved_activation_bytes")), _times(r, "naive"), _times(r, "compile"),
    ])  # fmt: skip


def model_table(rows: list[dict[str, Any]]) -> list[str]:
    head = (
        "| mode | model | variant | median ms | IQR ms (spread) | tokens/s | overhead vs plain | GPU busy ms "
        "| GPU-busy overhead | peak MiB | attached by |"
    )
    return _table(rows, "model", head, lambda r: [
        r["mode"], r["case"], r["provider"], f"{r['median_s'] * 1e3:.2f}", _spread(r),
        _fmt(r.get("tokens_per_s")), _overhead(r),
        _ms(r.get("device_s"), ".2f"), _fmt(r.get("device_overhead_pct"), "+.1f", suffix="%"),
        _mib(r.get("peak_mem_bytes")), r.get("attach", ""),
    ])  # fmt: skip


def task_bank_table(rows: list[dict[str, Any]]) -> list[str]:
    """Throughput of each variant, and the bank's relative to one target alone and to one call per
    task (x = throughput ratio, > 1 faster), with memory per added task."""
    head = (
        "| level | K | variant | median ms | IQR ms (spread) | tokens/s | x vs single | x vs per-task (a) "
        "| ω bytes / task | head bytes / task |"
    )
    return _table(rows, "task_bank", head, lambda r: [
        r.get("level"), r.get("k"), r["provider"], f"{r['median_s'] * 1e3:.2f}", _spread(r),
        _fmt(r.get("tokens_per_s")), _fmt(r.get("vs_single"), ".2f"),
        _fmt(r.get("vs_per_task"), ".2f"), _fmt(r.get("omega_bytes_per_task"), ".0f"),
        _fmt(r.get("head_bytes_per_task"), ".0f"),
    ])  # fmt: skip


def headline_dtype(rows: list[dict[str, Any]]) -> str | None:
    """The dtype the headline shows: the first of bf16, fp16, fp32 among the default-shape rows."""
    present = {r.get("dtype") for r in rows if r["kind"] == "scalearn" and _is_default(r)}
    return next((dt for dt in ("bfloat16", "float16", "float32", "float64") if dt in present), None)


def headline_table(rows: list[dict[str, Any]]) -> list[str]:
    """ScaLearn at the default shape: one row per provider, forward and forward+backward."""
    by: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    dtype = headline_dtype(rows)
    for r in rows:
        if r["kind"] == "scalearn" and _is_default(r) and r.get("dtype") == dtype:
            by[r["provider"]][r["mode"]] = r
    if not by:
        return []
    lines = [
        "| provider | fwd ms | fwd vs naive | fwd vs compile | fwd+bwd ms | fwd+bwd vs naive | "
        "fwd+bwd peak MiB | saved for bwd MiB (vs naive) | spread fwd / fwd+bwd |",
        "|" + "---|" * 9,
    ]
    for prov in sorted(by, key=lambda p: order("scalearn", p)):
        f, b = by[prov].get("fwd", {}), by[prov].get("fwdbwd", {})
        lines.append(
            f"| {prov} | {_fmt(f.get('median_s') and f['median_s'] * 1e3, '.2f')} | "
            f"{_times(f, 'naive')} | {_times(f, 'compile')} | "
            f"{_fmt(b.get('median_s') and b['median_s'] * 1e3, '.2f')} | "
            f"{_times(b, 'naive')} | "
            f"{_mib(b.get('peak_mem_bytes'))} | {_saved(b)} | {_pct_spread(f)} / {_pct_spread(b)} |"
        )
    return lines


def choices_table(rows: list[dict[str, Any]]) -> list[str]:
    """Which implementation each measured choice (``ops.path_choice``) picked, per case: what
    actually ran behind ``triton`` (fused or two-kernel) and ``auto`` (triton or torch)."""
    lines = []
    for r in rows:
        for key, picked in (r.get("path_choices") or {}).items():
            lines.append(f"| {r['kind']} | {r['mode']} | {r['case']} | {r['provider']} | {key} | {picked} |")
    if not lines:
        return []
    head = "| kind | mode | shape | provider | choice (shape class) | picked |"
    return [head, "|---|---|---|---|---|---|", *lines]


def skipped_table(device: dict[str, Any]) -> list[str]:
    """What did not run and why (providers unavailable here, failures, the time budget)."""
    skipped = device.get("skipped") or []
    if not skipped:
        return []
    lines = ["| kind | mode | shape | provider | reason |", "|---|---|---|---|---|"]
    for s in skipped:
        reason = str(s.get("reason", "")).replace("|", "/").replace("\n", " ")
        where = " | ".join(str(s.get(k)) for k in ("kind", "mode", "case", "provider"))
        lines.append(f"| {where} | {reason} |")
    return lines


def noise_lines(rows: list[dict[str, Any]]) -> list[str]:
    """How the spread is shown, and how many rows are noisy."""
    known = [r for r in rows if r.get("spread_pct") is not None]
    noisy = [r for r in known if r.get("noisy")]
    paired = sum(1 for r in rows if r.get("speedup_paired") or r.get("overhead_paired"))
    flagged = [r for r in rows if r.get("overhead_flag")]
    out = [
        "- spread: the IQR of a row's rounds, and IQR / median; rows above "
        f"{100 * NOISY_SPREAD:.0f}% are marked noisy ({len(noisy)} of {len(known)} rows with rounds)",
        "- ratios in [brackets]: rows timed in the same interleaved rounds give the median and "
        f"quartiles of per-round ratios ({paired} rows); other rows, the range their quartiles allow",
    ]
    if flagged:
        out.append(f"- {len(flagged)} model overhead(s) flagged as noise (negative, or interval reaching 0)")
    return out


def markdown(device: dict[str, Any], rows: list[dict[str, Any]], plots: list[str]) -> str:
    det = device.get("details", {})
    peaks = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in device.get("peak_tflops", {}).items())
    dtypes = sorted({r.get("dtype", "?") for r in rows})
    mem = sorted({r.get("peak_mem_method", "?") for r in rows})
    out = [
        f"# Benchmark results: {device['name']} ({device['kind']})",
        "",
        f"Generated {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} by "
        "`python -m scalearn_fast.bench report`.",
        "",
        f"- device: {device['name']}; " + ", ".join(f"{k}={v}" for k, v in det.items()),
        f"- roofline peaks ({device.get('peak_source')}): {peaks}; bandwidth "
        f"{device.get('peak_bw_tbps', 0):.3g} TB/s",
        f"- dtypes: {', '.join(dtypes)}; peak memory: {', '.join(mem)} (extra bytes during one call)",
        "- times are medians; speedups against the `naive` loop of the same shape and mode",
        *noise_lines(rows),
    ]
    clocks = [r["after_sm_clock_mhz"] for r in rows if r.get("after_sm_clock_mhz")]
    power = [r["after_power_w"] for r in rows if r.get("after_power_w")]
    if clocks:
        out.append(
            f"- sampled right after each case's timed rounds: SM clock {min(clocks)}-{max(clocks)} MHz"
            + (f", power {min(power):.0f}-{max(power):.0f} W" if power else "")
            + " (the device line above is one idle sample)"
        )
    for name, text in device.get("peaks_per_input", {}).items():
        out.append(f"- peaks of the run in {name} (its rows' % roofline use them): {text}")
    out += [""]
    head = headline_table(rows)
    if head:
        out += [
            f"## Headline: ScaLearn layer, d={DEFAULT['d']}, N={DEFAULT['n']}, T={DEFAULT['tokens']}, "
            f"{headline_dtype(rows)}",
            "",
        ]
        out += head + [""]
    for kind, title in (
        ("scalearn", "ScaLearn layer"),
        ("fusion", "AdapterFusion layer"),
        ("lora_mixture", "LoRA mixture (MoSLD) layer"),
        ("router", "Routed composition (L2R)"),
    ):
        if any(r["kind"] == kind for r in rows):
            out += [f"## {title}", ""] + layer_table(rows, kind) + [""]
    if any(r["kind"] == "model" for r in rows):
        out += ["## Model level", ""] + model_table(rows) + [""]
    if any(r["kind"] == "task_bank" for r in rows):
        out += ["## Task banks (K targets in one batch)", ""] + task_bank_table(rows) + [""]
    choices = choices_table(rows)
    if choices:
        out += ["## Measured path choices", ""] + choices + [""]
    skipped = skipped_table(device)
    if skipped:
        out += ["## Not measured", ""] + skipped + [""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)
