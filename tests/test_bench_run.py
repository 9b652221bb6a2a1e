"""The benchmark run's logic without timing anything that matters: spread and paired ratios,
the round policy, the report's noise flags and publishing, the roofline's axes, the progress
line, the interleaved group runner on trivial steps, and the GPU command's dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalearn_fast.bench.interleave import RoundPolicy, rotation
from scalearn_fast.bench.progress import Progress
from scalearn_fast.bench.report import overhead_flag, write_report
from scalearn_fast.bench.report_plots import merge_labels, roofline_range
from scalearn_fast.bench.results import ResultWriter
from scalearn_fast.bench.stats import paired_ratio, quartiles, ratio_interval, relative_spread, summarize

ROOT = Path(__file__).resolve().parents[1]
DEVICE = {
    "kind": "cuda",
    "name": "Fake GPU 9000",
    "peak_tflops": {"bf16": 100.0},
    "peak_bw_tbps": 1.0,
    "peak_source": "datasheet:test",
    "details": {},
}


def test_quartiles_summary_and_ratios() -> None:
    assert quartiles([4.0]) == (4.0, 4.0, 4.0)
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0], iterations=3)
    assert (s["median"], s["iqr"], s["min"], s["max"], s["rounds"], s["iterations"]) == (
        3.0,
        2.0,
        1.0,
        5.0,
        5,
        3,
    )
    assert relative_spread(s) == pytest.approx(2.0 / 3.0)
    assert relative_spread({"median": 2.0, "q1": 1.5, "q3": 2.5}) == pytest.approx(0.5)
    assert relative_spread({"median": 2.0}) is None
    # per-round ratios: a machine-wide slow round cancels
    assert paired_ratio([10.0, 20.0, 10.0], [1.0, 2.0, 1.0]) == (10.0, 10.0, 10.0)
    assert paired_ratio([1.0, 2.0], [1.0]) is None
    assert ratio_interval({"q1": 9.0, "q3": 11.0}, {"q1": 0.9, "q3": 1.1}) == pytest.approx(
        (9 / 1.1, 11 / 0.9)
    )
    assert ratio_interval({"q1": None, "q3": 1.0}, {"q1": 1.0, "q3": 1.0}) is None


def test_round_policy_and_rotation() -> None:
    policy = RoundPolicy(min_rounds=3, max_rounds=10, budget_s=1.0, target_spread=0.1)
    assert policy.planned(0.25) == 4 and policy.planned(10.0) == 3 and policy.planned(0.001) == 10
    steady, noisy = [1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 2.0]
    assert policy.more({"a": steady[:2]}, planned=3, elapsed_s=0.0)  # below the plan
    assert not policy.more({"a": steady}, planned=4, elapsed_s=0.5)  # planned and quiet
    assert policy.more({"a": steady, "b": noisy}, planned=4, elapsed_s=0.5)  # one noisy step: more
    assert not policy.more({"a": noisy}, planned=4, elapsed_s=2.0)  # twice the budget: stop
    assert not policy.more({"a": noisy * 3}, planned=4, elapsed_s=0.5)  # max_rounds reached
    assert rotation(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotation(["a", "b", "c"], 4) == ["b", "c", "a"]


def _row(kind: str, provider: str, mode: str, rounds: list[float], group: str | None) -> dict:
    case = "L2-d768-N8-B8xS128-bfloat16" if kind == "model" else "d768-r48-N8-T4096-bfloat16"
    info = {
        "kind": kind,
        "provider": provider,
        "mode": mode,
        "case": case,
        "d": 768,
        "r": 48,
        "n": 8,
        "tokens": 4096,
        "dtype": "bfloat16",
        "layers": 2,
        "seq": 128,
        "device": DEVICE,
        "round_s": rounds,
    }
    if group:
        info["interleaved"] = group
    return {"name": f"{kind}-{provider}-{mode}", "extra_info": info, "stats": summarize(rounds)}


def test_report_pairs_interleaved_rounds_flags_noise_and_lists_skips(tmp_path: Path) -> None:
    # the machine slows down in round 3 for both providers: per-round ratios stay at 10
    naive = _row("scalearn", "naive", "fwd", [10.0, 10.0, 30.0, 10.0, 10.0], "g1")
    torch_row = _row("scalearn", "torch", "fwd", [1.0, 1.0, 3.0, 1.0, 1.0], "g1")
    plain = _row("model", "plain", "infer", [1.00, 1.02, 1.00, 1.05, 1.00], "g2")
    fused = _row("model", "scalearn_fused", "infer", [0.95, 1.00, 0.99, 1.10, 0.97], "g2")
    noisy = _row("model", "scalearn_naive", "infer", [1.0, 3.0, 1.0, 3.0, 2.0], "g2")
    doc = {
        "benchmarks": [naive, torch_row, plain, fused, noisy],
        "skipped": [
            {"kind": "scalearn", "mode": "fwd", "case": "x", "provider": "triton", "reason": "needs CUDA"},
            {"kind": "scalearn", "mode": "fwd", "case": naive["extra_info"]["case"], "provider": "torch",
             "reason": "measured in this file after all"},
        ],
    }  # fmt: skip
    src = tmp_path / "run" / "raw.json"
    src.parent.mkdir()
    src.write_text(json.dumps(doc))
    published = tmp_path / "results"
    written = write_report([src], src.parent, plots=False)
    assert "published" not in written and not published.exists()  # no flag, nothing published
    rows = {r["provider"]: r for r in json.loads(written["json"].read_text())["results"]}
    assert rows["torch"]["speedup_vs_naive"] == pytest.approx(10.0)  # ratio of medians would be too
    assert rows["torch"]["speedup_vs_naive_interval"] == pytest.approx([10.0, 10.0])
    assert rows["torch"]["speedup_paired"] is True
    assert rows["scalearn_fused"]["overhead_pct"] < 0
    assert rows["scalearn_fused"]["overhead_flag"] == "negative: noise"
    assert rows["scalearn_naive"]["noisy"] is True and rows["plain"]["noisy"] is False
    md = written["md"].read_text()
    assert "(negative: noise)" in md
    assert "IQR ms (spread)" in md and "noisy)" in md
    assert "10.00x [10.00–10.00]" in md
    assert "## Not measured" in md and "| scalearn | fwd | x | triton | needs CUDA |" in md
    assert "measured in this file after all" not in md  # a measured row drops its skip entry
    again = write_report([src], src.parent, plots=False, publish=published)
    assert again["published"] == published
    assert sorted(p.name for p in published.iterdir()) == ["fake-gpu-9000.json", "fake-gpu-9000.md"]


def test_overhead_flag() -> None:
    assert overhead_flag(None, None) is None
    assert overhead_flag(-2.0, None) == "negative: noise"
    assert overhead_flag(3.0, (-1.0, 6.0)) == "within noise"
    assert overhead_flag(3.0, (1.0, 6.0)) is None


def test_roofline_axes_hold_both_roofs_and_ticks_are_plain(tmp_path: Path) -> None:
    lo, hi = roofline_range([30.0, 45.0], [100.0 / 1.0])  # points left of a ridge at 100
    assert lo < 30.0 and hi > 100.0 and hi / lo >= 100
    lo, hi = roofline_range([300.0, 400.0], [20.0])  # CPU-like: ridge far left of the points
    assert lo < 20.0 < 400.0 < hi
    labels = merge_labels([(100.0, 1.0, "N8 T4096"), (101.0, 2.0, "N8 T16384"), (300.0, 1.0, "N2 T4096")])
    assert labels == [(100.0, 2.0, "N8 T4096 / N8 T16384"), (300.0, 1.0, "N2 T4096")]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalearn_fast.bench.report_plots import _readable_log_ticks

    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_xlim(25.0, 48.0)  # the range whose default ticks read "3×10¹4×10¹"
    _readable_log_ticks(ax.xaxis)
    fig.canvas.draw()
    major = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    minor = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
    plt.close(fig)
    assert minor == [] and all("×" not in t and "10^" not in t for t in major)


def test_progress_counts_cases_and_estimates_the_rest() -> None:
    now = [0.0]
    p = Progress(["a", "b", "c"], [1.0, 1.0, 2.0], clock=lambda: now[0])
    assert p.start("a").startswith("[bench] case 1 of 3, 0s so far, ETA after the first case")
    now[0] = 10.0
    p.finish("a")
    assert "case 2 of 3, 10s so far, ETA ~30s: b" in p.start("b")
    with pytest.raises(ValueError, match="ids and weights"):
        Progress(["a"], [])


def test_run_group_interleaves_skips_and_reports_failures(tmp_path: Path) -> None:
    from scalearn_fast.bench.device import DeviceRecord
    from scalearn_fast.bench.flops import OpCost
    from scalearn_fast.bench.harness import Candidate, run_group
    from scalearn_fast.bench.providers import ProviderUnavailable

    def unavailable():
        raise ProviderUnavailable("not here")

    def broken():
        raise RuntimeError("boom")

    x = torch.ones(8)
    cands = [
        Candidate("a", lambda: ((lambda: x + 1), 1)),
        Candidate("b", lambda: ((lambda: x * 2), 1), params={"attach": "b-way"}),
        Candidate("c", unavailable),
        Candidate("d", broken),
    ]
    writer = ResultWriter(tmp_path / "raw.json")
    record = DeviceRecord("cpu", "test cpu", {"fp32": 1.0}, 1.0, "measured", {"cores": 1})
    params = {"kind": "scalearn", "mode": "fwd", "case": "tiny", "d": 8, "r": 1, "n": 1}
    with pytest.raises(AssertionError, match="d: failed: RuntimeError: boom"):
        run_group(
            writer,
            cands,
            params=params,
            tokens=8,
            cost=OpCost(8.0, 32.0),
            record=record,
            dtype=torch.float32,
            device=torch.device("cpu"),
            quick=True,
        )
    doc = json.loads((tmp_path / "raw.json").read_text())
    rows = {b["extra_info"]["provider"]: b for b in doc["benchmarks"]}
    assert set(rows) == {"a", "b"}
    a, b = rows["a"]["extra_info"], rows["b"]["extra_info"]
    assert a["interleaved"] == b["interleaved"] and len(a["round_s"]) == len(b["round_s"]) >= 2
    assert rows["a"]["stats"]["rounds"] == len(a["round_s"]) and b["attach"] == "b-way"
    reasons = {s["provider"]: s["reason"] for s in doc["skipped"]}
    assert reasons == {"c": "not here", "d": "failed: RuntimeError: boom"}


def _script(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        ["bash", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_gpu_run_dry_run_lists_every_stage_in_order() -> None:
    res = _script("scripts/gpu_run.sh", "--dry-run", "--out", "gpu-out/dry")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    stages = [
        out.index(f"{i}. {name} (")
        for i, name in enumerate(("native", "tests", "bench", "profile", "report"), 1)
    ]
    assert stages == sorted(stages)
    assert "tests/test_triton_kernels.py" in out and "scripts/gpu_profile.py" in out
    assert "--bench-json gpu-out/dry/raw.json" in out and "--bench-budget" in out
    groups = [line.strip() for line in out.splitlines() if "::test_" in line]
    # the default shape of every layer op first, then the model (eager, CUDA graph, training), then sweeps
    assert groups[0].endswith("test_scalearn_layer[d768-r48-N8-T4096-bfloat16-fwd]")
    assert any(g.endswith("-infer_graph]") for g in groups[:7])
    first_sweep = next(i for i, g in enumerate(groups) if "-N2-" in g)
    # the 7 default-shape groups (and the exported model's, after them) come before any sweep
    assert first_sweep >= 7 and all("-N8-" in g for g in groups[:first_sweep])
    assert not any("export" in g for g in groups[:7]) and any("-T65536-" in g for g in groups)
    total = int(out.split("total limit: ")[1].split("s")[0])
    assert total <= 480  # 8 minutes


def test_gpu_run_and_bench_refuse_bad_arguments() -> None:
    res = _script("scripts/gpu_run.sh", "--only", "tests,nonsense", "--dry-run")
    assert res.returncode == 2 and "--only takes native, tests, bench, profile, report" in res.stderr
    res = _script("scripts/bench.sh", "--publish", "--bench-quick")
    assert res.returncode == 2 and "tiny smoke shapes are not results" in res.stderr


def test_graph_inference_needs_cuda_and_says_so() -> None:
    from scalearn_fast.bench.matrix import ModelCase
    from scalearn_fast.bench.model import build_model, graph_inference_step
    from scalearn_fast.bench.providers import ProviderUnavailable

    case = ModelCase(1, 32, 2, 64, 2, 1, 8, torch.float32)
    m = build_model("plain", case, torch.device("cpu"))
    with pytest.raises(ProviderUnavailable, match="CUDA graphs need a CUDA device"):
        graph_inference_step(m, torch.zeros(1, 8, dtype=torch.long))


def test_run_folders_are_ignored_by_git() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    res = subprocess.run(
        ["git", "check-ignore", "-q", "bench/runs/cpu-some-other-cpu-4c-20260101T000000Z/raw.json"],
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 0  # a run on another machine adds nothing git would list
