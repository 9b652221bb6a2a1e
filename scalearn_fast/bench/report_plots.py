"""The report's plots: speedup vs N and vs T (with the ratio intervals as error bars), and a
roofline per op (both roofs in range, readable ticks, points labelled with their shape)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .matrix import DEFAULT_SHAPE as DEFAULT
from .report_order import order

DTYPE_KEY = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sweep(rows: list[dict[str, Any]], axis: str) -> dict[str, dict[str, list[tuple]]]:
    """mode -> provider -> [(x, speedup, low, high)] for ScaLearn rows on the default line of ``axis``."""
    fixed = {k: v for k, v in DEFAULT.items() if k != axis}
    out: dict[str, dict[str, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["kind"] != "scalearn" or r.get("speedup_vs_naive") is None:
            continue
        if all(r.get(k) == v for k, v in fixed.items()):
            v = r["speedup_vs_naive"]
            lo, hi = r.get("speedup_vs_naive_interval") or (v, v)
            out[r["mode"]][r["provider"]].append((r[axis], v, min(lo, v), max(hi, v)))
    return out


def _readable_log_ticks(axis: Any, base: int = 10) -> None:
    """Labels at 1, 2 and 5 of each decade as plain numbers, no minor labels: matplotlib's
    default labels minor ticks on short log ranges, which overlap ("3×10¹4×10¹")."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=base, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_sweep(rows: list[dict[str, Any]], axis: str, label: str, path: Path, title: str) -> bool:
    data = _sweep(rows, axis)
    if not data or all(len(pts) < 2 for provs in data.values() for pts in provs.values()):
        return False
    plt = _plt()
    modes = sorted(data)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for prov in sorted(data[mode], key=lambda p: order("scalearn", p)):
            pts = sorted(data[mode][prov])
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=prov)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("speedup vs naive loop (bars: IQR)")
        ax.set_title(f"{mode}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def roofline_range(xs: list[float], ridges: list[float]) -> tuple[float, float]:
    """An x range (FLOP/byte) holding every point and every ridge with margin, at least two
    decades wide, so both the bandwidth roof and the flat roof show."""
    values = [v for v in [*xs, *ridges] if v > 0]
    if not values:
        return 0.1, 10.0
    lo, hi = min(values) / 3, max(values) * 3
    if math.log10(hi / lo) < 2:
        mid = math.sqrt(lo * hi)
        lo, hi = mid / 10, mid * 10
    return lo, hi


def shape_label(r: dict[str, Any]) -> str:
    """A short shape label: ``N8 T4096`` (``d1024 ...`` when d is not the default)."""
    d = "" if r.get("d") == DEFAULT["d"] else f"d{r.get('d')} "
    return f"{d}N{r.get('n')} T{r.get('tokens')}"


def merge_labels(points: list[tuple[float, float, str]], rel: float = 0.07) -> list[tuple[float, float, str]]:
    """One label per x position (x, top y, text): points whose x differ by less than ``rel``
    (in log10) share a label, their texts joined with " / "."""
    out: list[tuple[float, float, str]] = []
    for x, y, text in sorted(points):
        if out and abs(math.log10(x) - math.log10(out[-1][0])) < rel:
            px, py, ptext = out[-1]
            texts = ptext.split(" / ")
            out[-1] = (px, max(py, y), ptext if text in texts else f"{ptext} / {text}")
        else:
            out.append((x, y, text))
    return out


def _roofs(device: dict[str, Any], rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(dtype key, peak TFLOP/s) for the dtypes the rows ran in (every datasheet one if none match)."""
    peaks = {k: v for k, v in device.get("peak_tflops", {}).items() if not k.endswith("_measured") and v > 0}
    used = {DTYPE_KEY.get(r.get("dtype", ""), "") for r in rows}
    chosen = [(k, v) for k, v in peaks.items() if k in used]
    return chosen or list(peaks.items())


def tflops_error(rows: list[dict[str, Any]]) -> list[list[float]]:
    """Error bars (below, above) on each row's TFLOP/s from its time quartiles (0 when unknown)."""
    below, above = [], []
    for r in rows:
        y = r["tflops"]
        q1, q3 = r.get("q1_s"), r.get("q3_s")
        below.append(max(0.0, y - r["flops"] / q3 / 1e12) if q3 else 0.0)
        above.append(max(0.0, r["flops"] / q1 / 1e12 - y) if q1 else 0.0)
    return [below, above]


def plot_roofline(device: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> bool:
    pts = [r for r in rows if r["kind"] in ("scalearn", "fusion") and r.get("tflops") and r.get("intensity")]
    bw = device.get("peak_bw_tbps", 0.0)
    roofs = _roofs(device, pts)
    if not pts or bw <= 0 or not roofs:
        return False
    plt = _plt()
    kinds = [k for k in ("scalearn", "fusion") if any(r["kind"] == k for r in pts)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(7.5 * len(kinds), 5.5), squeeze=False)
    providers = sorted({r["provider"] for r in pts}, key=lambda p: order("scalearn", p))
    cmap = plt.get_cmap("tab10" if len(providers) <= 10 else "tab20")
    colours = {p: cmap(i) for i, p in enumerate(providers)}
    markers = {"fwd": "o", "fwdbwd": "s"}
    for ax, kind in zip(axes[0], kinds, strict=True):
        mine = [r for r in pts if r["kind"] == kind]
        lo, hi = roofline_range([r["intensity"] for r in mine], [peak / bw for _, peak in roofs])
        for dt, peak in roofs:
            ridge = peak / bw
            grid = [lo, min(max(ridge, lo), hi), hi]
            ax.plot(grid, [min(peak, bw * x) for x in grid], lw=1.2, color="black", alpha=0.6)
            ax.annotate(f"{dt} {peak:.3g} TFLOP/s", (hi, peak), ha="right", va="bottom", fontsize=7)
        ax.annotate(f"{bw:.3g} TB/s", (lo * 1.2, bw * lo * 1.2), fontsize=7, rotation=20)
        for prov in providers:
            for mode, mk in markers.items():
                s = [r for r in mine if r["provider"] == prov and r["mode"] == mode]
                if not s:
                    continue
                ys = [r["tflops"] for r in s]
                ax.errorbar(
                    [r["intensity"] for r in s],
                    ys,
                    yerr=tflops_error(s),
                    fmt=mk,
                    ms=4,
                    capsize=2,
                    color=colours[prov],
                    label=f"{prov} {mode}",
                )
        labels = merge_labels([(r["intensity"], r["tflops"], shape_label(r)) for r in mine])
        for x, y, text in labels:
            ax.annotate(text, (x, y), xytext=(0, 6), textcoords="offset points", rotation=90, fontsize=6,
                        ha="center", va="bottom", color="dimgrey")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ys_all = [r["tflops"] for r in mine]
        ax.set_xlim(lo, hi)
        ax.set_ylim(min(min(ys_all) / 3, bw * lo), max(p for _, p in roofs) * 10)  # room for the labels
        _readable_log_ticks(ax.xaxis)
        ax.set_xlabel("arithmetic intensity (FLOP / minimum byte)")
        ax.set_ylabel("achieved TFLOP/s (bars: IQR)")
        ax.set_title(f"{'ScaLearn' if kind == 'scalearn' else 'AdapterFusion'} layer")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Roofline: {device['name']} ({device.get('peak_source')}); labels: shape")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(device: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path, slug: str) -> dict:
    """The PNGs that have data, by key (speedup_vs_n, speedup_vs_t, roofline)."""
    written: dict[str, Path] = {}
    specs = (
        ("speedup_vs_n", "n", "N (source adapters)", "ScaLearn speedup vs N (d=768, T=4096)"),
        ("speedup_vs_t", "tokens", "T (tokens)", "ScaLearn speedup vs T (d=768, N=8)"),
    )
    for key, axis, label, title in specs:
        p = out_dir / f"{slug}-{key.replace('_', '-')}.png"
        if plot_sweep(rows, axis, label, p, title):
            written[key] = p
    p = out_dir / f"{slug}-roofline.png"
    if plot_roofline(device, rows, p):
        written["roofline"] = p
    return written
