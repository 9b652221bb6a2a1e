"""The benchmark report generator on a synthetic pytest-benchmark JSON, and the bench providers'
agreement with each other (tiny shapes, CPU): both must hold for the suite's numbers to mean much."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scalearn_fast.bench.flops import scalearn_cost
from scalearn_fast.bench.providers import (
    FUSION_PROVIDERS,
    SCALEARN_PROVIDERS,
    adapters_installed,
    make_sources,
)
from scalearn_fast.bench.report import write_report

DEVICE = {
    "kind": "cuda",
    "name": "Fake GPU 9000",
    "peak_tflops": {"bf16": 100.0},
    "peak_bw_tbps": 1.0,
    "peak_source": "datasheet:test",
    "details": {"driver": "0.0"},
}


def _bench(kind: str, provider: str, mode: str, n: int, tokens: int, median: float) -> dict:
    case = f"d768-r48-N{n}-T{tokens}-bfloat16"
    info = {
        "kind": kind,
        "provider": provider,
        "mode": mode,
        "case": case,
        "d": 768,
        "r": 48,
        "n": n,
        "tokens": tokens,
        "dtype": "bfloat16",
        "peak_mem_bytes": 3 * 2**20,
        "peak_mem_method": "torch.cuda.max_memory_allocated",
        "device": DEVICE,
    }
    if kind != "model":
        cost = scalearn_cost(tokens, 768, 48, n, elem_bytes=2, backward=mode == "fwdbwd")
        info.update(
            flops=cost.flops,
            min_bytes=cost.min_bytes,
            intensity=cost.intensity,
            tflops=cost.flops / median / 1e12,
            tokens_per_s=tokens / median,
        )
    return {
        "name": f"test[{case}-{provider}-{mode}]",
        "group": kind,
        "extra_info": info,
        "stats": {"median": median, "stddev": 0.0, "rounds": 5},
    }


def _synthetic() -> dict:
    benches = []
    for n in (2, 8, 32):
        for mode in ("fwd", "fwdbwd"):
            benches.append(_bench("scalearn", "naive", mode, n, 4096, 1e-3 * n))
            benches.append(_bench("scalearn", "torch", mode, n, 4096, 1e-4 * n))
    for t in (512, 16384):
        benches.append(_bench("scalearn", "naive", "fwd", 8, t, t * 1e-6))
        benches.append(_bench("scalearn", "torch", "fwd", 8, t, t * 2.5e-7))
    for b in benches:
        e = b["extra_info"]
        if e["mode"] == "fwdbwd" and e["n"] == 8:
            e["saved_activation_bytes"] = {"naive": 8 * 2**20, "torch": 2**20}[e["provider"]]
    auto = _bench("scalearn", "auto", "fwd", 8, 4096, 7e-4)
    key = "forward 0 torch.bfloat16 768 384 4096 False False True True"
    auto["extra_info"]["path_choices"] = {key: "torch"}
    benches.append(auto)
    benches.append(_bench("model", "plain", "infer", 8, 4096, 0.010))
    benches.append(_bench("model", "scalearn_fused", "infer", 8, 4096, 0.0105))
    benches[-2]["extra_info"]["device_s"] = 0.004  # GPU busy 4 ms of the plain model's 10
    benches[-1]["extra_info"]["device_s"] = 0.0041
    benches.append({"name": "someone_elses_benchmark", "extra_info": {}, "stats": {"median": 1.0}})
    return {"benchmarks": benches}


def test_report_writes_tables_json_and_plots(tmp_path: Path) -> None:
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_synthetic()))
    written = write_report([src], tmp_path / "out")
    assert written["json"].name == "fake-gpu-9000.json"
    doc = json.loads(written["json"].read_text())
    assert doc["device"]["name"] == "Fake GPU 9000"
    rows = {(r["kind"], r["mode"], r["case"], r["provider"]): r for r in doc["results"]}
    assert len(rows) == 19  # the foreign benchmark is ignored
    fast = rows[("scalearn", "fwd", "d768-r48-N8-T4096-bfloat16", "torch")]
    assert fast["speedup_vs_naive"] == pytest.approx(10.0)
    assert fast["median_s"] == pytest.approx(8e-4)
    model = rows[("model", "infer", "d768-r48-N8-T4096-bfloat16", "scalearn_fused")]
    assert model["overhead_pct"] == pytest.approx(5.0)
    assert model["device_overhead_pct"] == pytest.approx(2.5)
    md = written["md"].read_text()
    assert "| fwd | d768-r48-N8-T4096-bfloat16 | torch | 0.800 |" in md
    assert "## Headline" in md and "| torch | 0.80 | 10.00x |" in md
    assert "| 3.0 | 1.0 (12.5%) |" in md  # headline: peak MiB, then saved for backward vs naive
    assert "+5.0%" in md and "| 4.10 | +2.5% |" in md
    assert "## Measured path choices" in md
    assert "| scalearn | fwd | d768-r48-N8-T4096-bfloat16 | auto | forward 0 torch.bfloat16 768 384" in md
    for key in ("speedup_vs_n", "speedup_vs_t", "roofline"):
        png = written[key]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
        assert png.name in md


def test_report_rejects_foreign_json(tmp_path: Path) -> None:
    src = tmp_path / "run.json"
    src.write_text(json.dumps({"benchmarks": [{"name": "x", "extra_info": {}, "stats": {}}]}))
    with pytest.raises(ValueError, match="no scalearn_fast benchmark results"):
        write_report([src], tmp_path / "out", plots=False)


def test_report_recomputes_costs_refuses_mixed_devices_and_picks_one_headline_dtype(tmp_path: Path) -> None:
    stale = _bench("fusion", "torch", "fwd", 8, 4096, 1e-3)
    stale["extra_info"].update(flops=1.0, tflops=123.0, roofline_pct=999.0)  # counts of an older run
    fp32 = _bench("scalearn", "torch", "fwd", 8, 4096, 5e-3)
    fp32["extra_info"].update(dtype="float32", case="d768-r48-N8-T4096-float32")
    src = tmp_path / "run.json"
    src.write_text(json.dumps({"benchmarks": [*_synthetic()["benchmarks"], stale, fp32]}))
    doc = json.loads(write_report([src], tmp_path / "out", plots=False)["json"].read_text())
    row = next(r for r in doc["results"] if r["kind"] == "fusion")
    # R5 inference: 2T(3dR + 2Nd) + 3TR FLOPs, against the fake GPU's 100 bf16 TFLOP/s
    t, d, big_r, n = 4096, 768, 384, 8
    flops = 2 * t * (3 * d * big_r + 2 * n * d) + 3 * t * big_r
    assert row["flops"] == flops and row["tflops"] == pytest.approx(flops / 1e-3 / 1e12)
    assert row["roofline_pct"] == pytest.approx(100 * max(flops / 100e12, row["min_bytes"] / 1e12) / 1e-3)
    md = (tmp_path / "out" / "fake-gpu-9000.md").read_text()
    assert "T=4096, bfloat16" in md and "| torch | 0.80 | 10.00x |" in md  # not the fp32 row

    other = _bench("scalearn", "torch", "fwd", 8, 4096, 1e-3)
    other["extra_info"]["device"] = {**DEVICE, "name": "Another GPU"}
    src2 = tmp_path / "other.json"
    src2.write_text(json.dumps({"benchmarks": [other]}))
    with pytest.raises(ValueError, match="other.json holds results from another-gpu but .*fake-gpu-9000"):
        write_report([src, src2], tmp_path / "out", plots=False)


def _inputs(d: int = 32, n: int = 3) -> tuple:
    src = make_sources(n, d, 4, dtype=torch.float64, device="cpu", seed=3)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 5, d, generator=g, dtype=torch.float64)
    res = torch.randn(2, 5, d, generator=g, dtype=torch.float64)
    return src, z, res


@pytest.mark.parametrize("provider", ["reference", "torch"])
def test_scalearn_providers_agree_with_naive(provider: str) -> None:
    src, z, res = _inputs()
    naive = SCALEARN_PROVIDERS["naive"](src).module
    other = SCALEARN_PROVIDERS[provider](src).module
    with torch.no_grad():
        torch.testing.assert_close(other(z, res), naive(z, res))


def test_fusion_naive_matches_adapters_library() -> None:
    if not adapters_installed():
        pytest.skip("adapters is not installed")
    src, z, res = _inputs()
    naive = FUSION_PROVIDERS["naive"](src).module
    lib = FUSION_PROVIDERS["adapters"](src).module
    with torch.no_grad():
        torch.testing.assert_close(lib(z, res), naive(z, res))


def test_gpu_rounds_hold_enough_calls_and_cpu_keeps_its_clock() -> None:
    from scalearn_fast.bench.harness import iterations_for
    from scalearn_fast.bench.timing import use_device_clock

    assert iterations_for(50e-6) == 40  # ~2 ms a round
    assert iterations_for(5e-3) == 1
    assert iterations_for(0.0) == 1000

    class FakeBenchmark:
        _timer = staticmethod(lambda: 0.0)

    fake = FakeBenchmark()
    assert not use_device_clock(fake, torch.device("cpu"))
    assert fake._timer() == 0.0


def test_device_time_sums_gpu_events_per_call() -> None:
    from types import SimpleNamespace

    from scalearn_fast.bench.timing import device_time, kernel_totals

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [
        SimpleNamespace(device_type=cuda, self_device_time_total=300.0, count=10),  # µs over 5 calls
        SimpleNamespace(device_type=cuda, self_device_time_total=200.0, count=5),
        SimpleNamespace(device_type=cpu, self_device_time_total=0.0, count=99),
    ]
    seconds, launches = kernel_totals(events, calls=5)
    assert seconds == pytest.approx(100e-6) and launches == 3
    assert device_time(lambda: None, torch.device("cpu")) == {}  # CPU: nothing to split
