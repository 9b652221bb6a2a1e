"""pytest-benchmark JSON -> bench/results/<device>.json, <device>.md and PNG plots.

    python -m scalearn_fast.bench report run.json [more.json ...] [--out bench/results]

Rows are keyed by (kind, mode, case, provider); a later file wins on a duplicate key, so a
re-run of some cases can be merged over a full run (of the same device: mixing devices is
refused). Speedups are against the ``naive`` provider of the same kind, mode and case;
model-level rows get the overhead over ``plain``. FLOPs, bytes and the roofline are recomputed
from each row's shape with today's counts (``flops.row_cost``) and the peaks its own run
recorded, so older raw files report consistently.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .device import device_slug
from .flops import row_cost

DEFAULT = {"d": 768, "n": 8, "tokens": 4096}
PROVIDER_ORDER = ("naive", "reference", "compile", "adapters", "torch", "triton", "auto")
MODEL_ORDER = ("plain", "scalearn_naive", "scalearn_fused", "fusion_adapters", "fusion_fused")


def _order(kind: str, provider: str) -> tuple[int, str]:
    order = MODEL_ORDER if kind == "model" else PROVIDER_ORDER
    return (order.index(provider) if provider in order else len(order), provider)


def load_rows(paths: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(device record, one flat row per benchmark) from pytest-benchmark JSON files."""
    rows: dict[tuple, dict[str, Any]] = {}
    device: dict[str, Any] | None = None
    first: Path | None = None
    peaks: dict[str, str] = {}  # input file -> its run's peaks, when they differ (CPU: measured)
    for path in paths:
        data = json.loads(Path(path).read_text())
        for bench in data.get("benchmarks", []):
            info = dict(bench.get("extra_info") or {})
            if "kind" not in info:
                continue  # not one of ours
            rec = info.pop("device", None) or {}
            if device is None and rec:
                device, first = rec, Path(path)
            elif rec and device_slug(rec) != device_slug(device):
                raise ValueError(
                    f"{path} holds results from {device_slug(rec)} but {first} from {device_slug(device)}; "
                    "report one device at a time"
                )
            if rec:
                peaks[Path(path).name] = _peaks_text(rec)
            stats = bench.get("stats", {})
            row = {"name": bench.get("name"), **info}
            row["median_s"] = float(stats.get("median", info.get("median_s", 0.0)))
            row["stddev_s"] = stats.get("stddev")
            row["rounds"] = stats.get("rounds", info.get("rounds"))
            _recompute_cost(row, rec or device or {})
            rows[(row["kind"], row["mode"], row["case"], row["provider"])] = row
    if device is None:
        raise ValueError(f"no scalearn_fast benchmark results (extra_info with a device) in {paths}")
    if len(set(peaks.values())) > 1:
        device = {**device, "peaks_per_input": peaks}
    out = sorted(rows.values(), key=_row_key)
    _add_relative(out)
    return device, out


def _peaks_text(rec: dict[str, Any]) -> str:
    tflops = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in rec.get("peak_tflops", {}).items())
    return f"{tflops}; {rec.get('peak_bw_tbps', 0):.3g} TB/s"


def _recompute_cost(row: dict[str, Any], rec: dict[str, Any]) -> None:
    """FLOPs, bytes, TFLOP/s, GB/s and % roofline of ``row`` from its shape (``row_cost``) and the
    peaks of the run that measured it; left as recorded when the row lacks the fields."""
    cost = row_cost(row)
    median = row["median_s"]
    if cost is None or median <= 0:
        return
    key = {"bfloat16": "bf16", "float16": "fp16"}.get(row.get("dtype", ""), "fp32")
    roof = cost.roofline_time(rec.get("peak_tflops", {}).get(key, 0.0), rec.get("peak_bw_tbps", 0.0))
    row.update(
        flops=cost.flops,
        min_bytes=cost.min_bytes,
        intensity=cost.intensity,
        tflops=cost.flops / median / 1e12,
        gbps=cost.min_bytes / median / 1e9,
        roofline_s=roof or None,
        roofline_pct=100.0 * roof / median if roof else None,
    )


def _row_key(r: dict[str, Any]) -> tuple:
    shape = tuple(r.get(k) or 0 for k in ("layers", "d", "n", "tokens"))
    return (r["kind"], r["mode"], shape, r["case"], _order(r["kind"], r["provider"]))


def _add_relative(rows: list[dict[str, Any]]) -> None:
    base: dict[tuple, dict[str, float]] = defaultdict(dict)
    busy: dict[tuple, dict[str, float]] = defaultdict(dict)
    saved: dict[tuple, dict[str, int]] = defaultdict(dict)
    for r in rows:
        if r.get("saved_activation_bytes") is not None:
            saved[(r["kind"], r["mode"], r["case"])][r["provider"]] = r["saved_activation_bytes"]
        base[(r["kind"], r["mode"], r["case"])][r["provider"]] = r["median_s"]
        if r.get("device_s"):
            busy[(r["kind"], r["mode"], r["case"])][r["provider"]] = r["device_s"]
    for r in rows:
        ref = base[(r["kind"], r["mode"], r["case"])]
        if r["kind"] == "model":
            plain = ref.get("plain")
            r["overhead_pct"] = 100.0 * (r["median_s"] / plain - 1.0) if plain else None
            plain_busy = busy[(r["kind"], r["mode"], r["case"])].get("plain")
            mine = r.get("device_s")
            r["device_overhead_pct"] = 100.0 * (mine / plain_busy - 1.0) if mine and plain_busy else None
        else:
            naive = ref.get("naive")
            r["speedup_vs_naive"] = naive / r["median_s"] if naive and r["median_s"] > 0 else None
            naive_saved = saved[(r["kind"], r["mode"], r["case"])].get("naive")
            mine = r.get("saved_activation_bytes")
            r["saved_vs_naive"] = mine / naive_saved if mine is not None and naive_saved else None
            comp = ref.get("compile")
            r["speedup_vs_compile"] = comp / r["median_s"] if comp and r["median_s"] > 0 else None


def _fmt(v: Any, spec: str = ".3g", none: str = "–", suffix: str = "") -> str:
    if v is None:
        return none
    return format(v, spec) + suffix


def _ms(seconds: Any, spec: str) -> str:
    return "–" if seconds is None else format(seconds * 1e3, spec)


def _saved(r: dict[str, Any]) -> str:
    """Saved-for-backward MiB, with the share of the naive loop's when known."""
    ratio = r.get("saved_vs_naive")
    share = "" if ratio is None else f" ({100 * ratio:.1f}%)"
    return _mib(r.get("saved_activation_bytes")) + share


def _mib(v: Any) -> str:
    return "–" if v is None else f"{v / 2**20:.1f}"


def _is_default(r: dict[str, Any]) -> bool:
    return r.get("d") == DEFAULT["d"] and r.get("n") == DEFAULT["n"] and r.get("tokens") == DEFAULT["tokens"]


def layer_table(rows: list[dict[str, Any]], kind: str) -> list[str]:
    head = (
        "| mode | shape | provider | median ms | GPU busy ms | tokens/s | TFLOP/s | GB/s | % roofline "
        "| peak MiB | saved MiB | vs naive | vs compile |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        if r["kind"] != kind:
            continue
        lines.append(
            f"| {r['mode']} | {r['case']} | {r['provider']} | {r['median_s'] * 1e3:.3f} | "
            f"{_ms(r.get('device_s'), '.3f')} | {_fmt(r.get('tokens_per_s'))} | "
            f"{_fmt(r.get('tflops'))} | {_fmt(r.get('gbps'))} | "
            f"{_fmt(r.get('roofline_pct'), '.1f')} | {_mib(r.get('peak_mem_bytes'))} | "
            f"{_mib(r.get('saved_activation_bytes'))} | "
            f"{_fmt(r.get('speedup_vs_naive'), '.2f', suffix='x')} | "
            f"{_fmt(r.get('speedup_vs_compile'), '.2f', suffix='x')} |"
        )
    return lines


def model_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| mode | model | variant | median ms | tokens/s | overhead vs plain | GPU busy ms "
        "| GPU-busy overhead | peak MiB | attached by |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        if r["kind"] != "model":
            continue
        lines.append(
            f"| {r['mode']} | {r['case']} | {r['provider']} | {r['median_s'] * 1e3:.2f} | "
            f"{_fmt(r.get('tokens_per_s'))} | {_fmt(r.get('overhead_pct'), '+.1f', suffix='%')} | "
            f"{_ms(r.get('device_s'), '.2f')} | {_fmt(r.get('device_overhead_pct'), '+.1f', suffix='%')} | "
            f"{_mib(r.get('peak_mem_bytes'))} | {r.get('attach', '')} |"
        )
    return lines


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
        "fwd+bwd peak MiB | saved for bwd MiB (vs naive) |",
        "|" + "---|" * 8,
    ]
    for prov in sorted(by, key=lambda p: _order("scalearn", p)):
        f, b = by[prov].get("fwd", {}), by[prov].get("fwdbwd", {})
        lines.append(
            f"| {prov} | {_fmt(f.get('median_s') and f['median_s'] * 1e3, '.2f')} | "
            f"{_fmt(f.get('speedup_vs_naive'), '.2f', suffix='x')} | "
            f"{_fmt(f.get('speedup_vs_compile'), '.2f', suffix='x')} | "
            f"{_fmt(b.get('median_s') and b['median_s'] * 1e3, '.2f')} | "
            f"{_fmt(b.get('speedup_vs_naive'), '.2f', suffix='x')} | {_mib(b.get('peak_mem_bytes'))} | "
            f"{_saved(b)} |"
        )
    return lines


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
    for kind, title in (("scalearn", "ScaLearn layer"), ("fusion", "AdapterFusion layer")):
        if any(r["kind"] == kind for r in rows):
            out += [f"## {title}", ""] + layer_table(rows, kind) + [""]
    if any(r["kind"] == "model" for r in rows):
        out += ["## Model level", ""] + model_table(rows) + [""]
    choices = choices_table(rows)
    if choices:
        out += ["## Measured path choices", ""] + choices + [""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


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


def _sweep(rows: list[dict[str, Any]], axis: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """mode -> provider -> [(x, speedup)] for ScaLearn rows on the default line of ``axis``."""
    fixed = {k: v for k, v in DEFAULT.items() if k != axis}
    out: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["kind"] != "scalearn" or r.get("speedup_vs_naive") is None:
            continue
        if all(r.get(k) == v for k, v in fixed.items()):
            out[r["mode"]][r["provider"]].append((r[axis], r["speedup_vs_naive"]))
    return out


def _plot_sweep(rows, axis: str, label: str, path: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _sweep(rows, axis)
    if not data or all(len(pts) < 2 for provs in data.values() for pts in provs.values()):
        return False
    modes = sorted(data)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for prov in sorted(data[mode], key=lambda p: _order("scalearn", p)):
            pts = sorted(data[mode][prov])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("speedup vs naive loop")
        ax.set_title(f"{mode}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_roofline(device: dict[str, Any], rows, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["kind"] in ("scalearn", "fusion") and r.get("tflops") and r.get("intensity")]
    bw = device.get("peak_bw_tbps", 0.0)
    if not pts or bw <= 0:
        return False
    fig, ax = plt.subplots(figsize=(9.5, 5))
    xs = [r["intensity"] for r in pts]
    lo, hi = min(xs) / 2, max(xs) * 2
    for dt, peak in device.get("peak_tflops", {}).items():
        if dt.endswith("_measured") or peak <= 0:
            continue
        ridge = peak / bw
        grid = [lo, min(max(ridge, lo), hi), hi]
        ax.plot(grid, [min(peak, bw * x) for x in grid], lw=1.2, label=f"roof {dt} ({peak:.3g} TFLOP/s)")
    # colour = provider, marker = kind and mode: every series is told apart at a glance
    providers = sorted({r["provider"] for r in pts}, key=lambda p: _order("scalearn", p))
    cmap = plt.get_cmap("tab10" if len(providers) <= 10 else "tab20")
    colours = {p: cmap(i) for i, p in enumerate(providers)}
    markers = {
        ("scalearn", "fwd"): "o",
        ("scalearn", "fwdbwd"): "s",
        ("fusion", "fwd"): "^",
        ("fusion", "fwdbwd"): "D",
    }
    for prov in providers:
        for (kind, mode), mk in markers.items():
            s = [r for r in pts if r["provider"] == prov and r["kind"] == kind and r["mode"] == mode]
            if s:
                ax.scatter(
                    [r["intensity"] for r in s],
                    [r["tflops"] for r in s],
                    marker=mk,
                    s=22,
                    color=colours[prov],
                    label=f"{kind} {prov} {mode}",
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / minimum byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"Roofline: {device['name']} ({device.get('peak_source')})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(paths: list[Path], out_dir: Path, *, plots: bool = True) -> dict[str, Path]:
    """Write <slug>.json, <slug>.md and the PNGs into ``out_dir``; returns what was written."""
    device, rows = load_rows([Path(p) for p in paths])
    slug = device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    pngs: list[str] = []
    if plots:
        specs = (
            ("speedup_vs_n", "n", "N (source adapters)", "ScaLearn speedup vs N (d=768, T=4096)"),
            ("speedup_vs_t", "tokens", "T (tokens)", "ScaLearn speedup vs T (d=768, N=8)"),
        )
        for key, axis, label, title in specs:
            p = out_dir / f"{slug}-{key.replace('_', '-')}.png"
            if _plot_sweep(rows, axis, label, p, title):
                written[key] = p
                pngs.append(p.name)
        p = out_dir / f"{slug}-roofline.png"
        if _plot_roofline(device, rows, p):
            written["roofline"] = p
            pngs.append(p.name)
    doc = {
        "device": device,
        "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "inputs": [str(p) for p in paths],
        "results": rows,
    }
    written["json"] = out_dir / f"{slug}.json"
    written["json"].write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    written["md"] = out_dir / f"{slug}.md"
    written["md"].write_text(markdown(device, rows, pngs))
    return written
