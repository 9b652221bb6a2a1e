"""Run rows -> <device>.json, <device>.md and PNG plots.

    python -m scalearn_fast.bench report RUN/raw.json [more.json ...] --out RUN [--publish]

Inputs are the suite's row files (``results.ResultWriter``) or pytest-benchmark JSON. Rows are
keyed by (kind, mode, case, provider); a later file wins on a duplicate key, so a re-run of
some cases can be merged over a full run (of the same device: mixing devices is refused).
Speedups are against the ``naive`` provider of the same kind, mode and case; model-level rows
get the overhead over ``plain``. Rows timed in the same interleaved rounds are compared round
by round (``stats.paired_ratio``): the ratio is the median of per-round ratios, with its
quartiles as the interval; other rows get the ratio of medians and the interval their
quartiles allow. Every row carries its spread (IQR / median) and is marked noisy above 10%;
a negative model overhead is flagged as noise. FLOPs, bytes and the roofline are recomputed
from each row's shape with today's counts (``flops.row_cost``) and the peaks its own run
recorded, so older raw files report consistently.

The report goes into ``--out`` (a run's own folder); ``--publish`` also copies it into
``bench/results/``, the committed results.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from .device import device_slug
from .flops import row_cost
from .report_md import markdown
from .report_order import order
from .stats import is_noisy, paired_ratio, ratio_interval, relative_spread

PUBLISH_DIR = Path("bench/results")


def load_rows(paths: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(device record, one flat row per benchmark) from row files; the providers that did not
    run, and why, are in the device record's ``skipped`` (those measured in a later file dropped)."""
    rows: dict[tuple, dict[str, Any]] = {}
    skipped: dict[tuple, dict[str, Any]] = {}
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
            row = {"name": bench.get("name"), **info}
            _read_stats(row, bench.get("stats", {}), info)
            _recompute_cost(row, rec or device or {})
            key = (row["kind"], row["mode"], row["case"], row["provider"])
            rows[key] = row
            skipped.pop(key, None)
        for skip in data.get("skipped", []):
            key = tuple(skip.get(k) for k in ("kind", "mode", "case", "provider"))
            if key not in rows:
                skipped[key] = skip
    if device is None:
        raise ValueError(f"no scalearn_fast benchmark results (extra_info with a device) in {paths}")
    if len(set(peaks.values())) > 1:
        device = {**device, "peaks_per_input": peaks}
    if skipped:
        device = {**device, "skipped": list(skipped.values())}
    out = sorted(rows.values(), key=_row_key)
    _add_relative(out)
    return device, out


def _read_stats(row: dict[str, Any], stats: dict[str, Any], info: dict[str, Any]) -> None:
    """Median, quartiles, extremes and spread of ``row`` from its ``stats``."""
    row["median_s"] = float(stats.get("median", info.get("median_s", 0.0)))
    row["stddev_s"] = stats.get("stddev")
    row["rounds"] = stats.get("rounds", info.get("rounds"))
    for key in ("q1", "q3", "iqr", "min", "max"):
        row[f"{key}_s"] = stats.get(key)
    spread = relative_spread(stats)
    row["spread_pct"] = None if spread is None else 100.0 * spread
    row["noisy"] = is_noisy(spread)


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
    shape = tuple(r.get(k) or 0 for k in ("layers", "d", "n", "tokens", "k"))  # k: task-bank rows
    return (r["kind"], r["mode"], shape, r["case"], order(r["kind"], r["provider"]))


def _stats_of(r: dict[str, Any]) -> dict[str, Any]:
    return {"q1": r.get("q1_s"), "q3": r.get("q3_s")}


Interval = tuple[float, float]


def relative(num: dict[str, Any], den: dict[str, Any]) -> tuple[float | None, Interval | None, bool]:
    """(num/den, its interval, paired?) for two rows' times: per-round ratios when both were
    timed in the same interleaved rounds, else the ratio of medians and the quartiles' range."""
    if num.get("interleaved") and num.get("interleaved") == den.get("interleaved"):
        paired = paired_ratio(num.get("round_s") or [], den.get("round_s") or [])
        if paired is not None:
            return paired[1], (paired[0], paired[2]), True
    if not den["median_s"] or den["median_s"] <= 0:
        return None, None, False
    if None in (num.get("q1_s"), num.get("q3_s"), den.get("q1_s"), den.get("q3_s")):
        return num["median_s"] / den["median_s"], None, False
    return num["median_s"] / den["median_s"], ratio_interval(_stats_of(num), _stats_of(den)), False


def overhead_flag(pct: float | None, interval: tuple[float, float] | None) -> str | None:
    """Why a model overhead is noise rather than a result: negative (the composition cannot
    make the model faster), or an interval that reaches zero; None otherwise."""
    if pct is None:
        return None
    if pct < 0:
        return "negative: noise"
    if interval is not None and interval[0] <= 0:
        return "within noise"
    return None


def _add_relative(rows: list[dict[str, Any]]) -> None:
    group: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        group[(r["kind"], r["mode"], r["case"])][r["provider"]] = r
    for r in rows:
        peers = group[(r["kind"], r["mode"], r["case"])]
        if r["kind"] == "model":
            plain = peers.get("plain")
            ratio, interval, paired = relative(r, plain) if plain else (None, None, False)
            r["overhead_pct"] = None if ratio is None else 100.0 * (ratio - 1.0)
            r["overhead_interval_pct"] = None if interval is None else [100.0 * (x - 1.0) for x in interval]
            r["overhead_paired"] = paired
            r["overhead_flag"] = overhead_flag(r["overhead_pct"], r["overhead_interval_pct"])
            plain_busy = plain.get("device_s") if plain else None
            mine = r.get("device_s")
            r["device_overhead_pct"] = 100.0 * (mine / plain_busy - 1.0) if mine and plain_busy else None
            continue
        if r["kind"] == "task_bank":  # throughput relative to one target alone and to one call per task
            for peer, key in (("single", "vs_single"), ("per_task", "vs_per_task")):
                other = peers.get(peer)
                ratio, interval, _ = (
                    relative(other, r) if other and r["median_s"] > 0 else (None, None, False)
                )
                r[key] = ratio
                r[key + "_interval"] = list(interval) if interval else None
            continue
        naive = peers.get("naive")
        ratio, interval, paired = relative(naive, r) if naive and r["median_s"] > 0 else (None, None, False)
        r["speedup_vs_naive"] = ratio
        r["speedup_vs_naive_interval"] = list(interval) if interval else None
        r["speedup_paired"] = paired
        naive_saved = naive.get("saved_activation_bytes") if naive else None
        mine = r.get("saved_activation_bytes")
        r["saved_vs_naive"] = mine / naive_saved if mine is not None and naive_saved else None
        comp = peers.get("compile")
        ratio, interval, _ = relative(comp, r) if comp and r["median_s"] > 0 else (None, None, False)
        r["speedup_vs_compile"] = ratio
        r["speedup_vs_compile_interval"] = list(interval) if interval else None


def write_report(
    paths: list[Path], out_dir: Path, *, plots: bool = True, publish: Path | None = None
) -> dict[str, Path]:
    """Write <slug>.json, <slug>.md and the PNGs into ``out_dir`` and, with ``publish``, copy
    them into that folder too; returns what was written (``published`` is the copy's folder)."""
    device, rows = load_rows([Path(p) for p in paths])
    slug = device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    pngs: list[str] = []
    if plots:
        from .report_plots import write_plots

        for key, p in write_plots(device, rows, out_dir, slug).items():
            written[key] = p
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
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        if publish.resolve() != out_dir.resolve():
            for path in list(written.values()):
                shutil.copy2(path, publish / path.name)
        written["published"] = publish
    return written
