"""The training CLI under ``torchrun --nproc_per_node 2`` (gloo, CPU) against one process with
the same global batch: the same ω and head, the same dev metrics at every evaluation. A tiny
random BERT (dropout 0, MiniLM tokenizer files), two random source adapters, the shipped MRPC
sample. Also the pieces the distributed run rests on (row sharding, trackers' names, gradient
checkpointing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the training CLI needs transformers")
pytest.importorskip("accelerate", reason="training runs on Accelerate (the hf extra)")

from tiny_bert_folder import save_tiny_bert  # noqa: E402

from scalearn_fast import cli  # noqa: E402
from scalearn_fast.train.distributed import shard_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Adam's first steps are about lr * sign(gradient), so two sums of the same gradient in another
# order (gloo's all-reduce vs one batch) may move a weight by a few ulps times the step count;
# anything near lr (1e-2 here) would be a real difference.
ATOL = 1e-5


def test_shard_rows_partition_a_global_batch():
    batch = {"input_ids": torch.arange(14).view(7, 2), "labels": torch.arange(7)}
    parts = [shard_rows(batch, r, 3) for r in range(3)]
    assert torch.cat([p["labels"] for p, _ in parts]).tolist() == list(range(7))
    assert [w for _, w in parts] == pytest.approx([2 * 3 / 7, 2 * 3 / 7, 3 * 3 / 7])
    # mean of the ranks' weighted means == the global mean
    loss = torch.rand(7)
    means = [loss[p["labels"]].mean() * w for p, w in parts]
    assert float(sum(means) / 3) == pytest.approx(float(loss.mean()))
    lone = [shard_rows({"x": torch.ones(1, 3)}, r, 2) for r in range(2)]
    assert [w for _, w in lone] == [0.0, 2.0] and lone[0][0]["x"].shape == (
        1,
        3,
    )  # rank 0: zero-weighted copy
    assert shard_rows(batch, 0, 1) == (batch, 1.0)


def test_report_to_names_are_checked():
    from scalearn_fast.train.loop import TrainConfig

    with pytest.raises(ValueError, match="report_to .*unknown tracker 'nosuch'"):
        TrainConfig(task="rte", lr=1e-3, report_to=("nosuch",))
    with pytest.raises(ValueError, match="fp16 and bf16"):
        TrainConfig(task="rte", lr=1e-3, fp16=True, bf16=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT folder (no dropout) and two random AdapterHub source adapters."""
    from scalearn_fast.train.adapter import attach_bottleneck_adapters, save_bottleneck_adapters

    root = tmp_path_factory.mktemp("ddp")
    model_dir = root / "tiny-bert"
    config = save_tiny_bert(model_dir, head=False, dropout=False)
    sources = []
    for seed, name in ((1, "sst-2"), (2, "qnli")):
        model = transformers.BertForSequenceClassification(config)
        attach_bottleneck_adapters(model, 8, seed=seed)
        sources.append(str(save_bottleneck_adapters(model, root / name, name, 8)))
    return root, model_dir, sources


def _argv(model_dir, sources, out) -> list[str]:
    # 27 training examples, global batch 8: the last batch (3 rows) splits 1 + 2 across two ranks;
    # 25 dev examples: the ranks' evaluation shares are padded with a duplicate that is dropped.
    return [
        "train-scalearn", "--task", "mrpc", "--sources", *sources, "--output", str(out),
        "--model", str(model_dir), "--device", "cpu", "--max-train-samples", "27", "--max-eval-samples", "25",
        "--batch-size", "8", "--max-length", "32", "--epochs", "2", "--eval-every", "2", "--patience", "0",
        "--omega-dropout", "0", "--lr", "0.01", "--seed", "0", "--no-progress",
    ]  # fmt: skip


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        out.update({f"{path.relative_to(folder)}:{k}": v for k, v in load_file(path).items()})
    for path in sorted(folder.rglob("*.bin")):
        state = torch.load(path, weights_only=True)
        out.update({f"{path.relative_to(folder)}:{k}": v for k, v in state.items()})
    return out


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch built without gloo")
def test_torchrun_two_processes_equal_one_process(setup):
    root, model_dir, sources = setup
    one, two = root / "one", root / "two"
    assert cli.main(_argv(model_dir, sources, one)) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scalearn_fast", *_argv(model_dir, sources, two)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count('"method"') == 1, proc.stdout  # only rank 0 prints the result
    assert not list(root.glob(".two.partial-*"))

    a, b = (json.loads((r / "results.json").read_text()) for r in (one, two))
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["steps"] == b["steps"] == 8
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]]
    for ha, hb in zip(a["history"], b["history"], strict=True):  # every evaluation, every metric
        assert ha == pytest.approx(hb, abs=1e-6)
    ta, tb = _tensors(one), _tensors(two)
    assert ta.keys() == tb.keys() and any("omega" in k for k in ta)
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], atol=ATOL, rtol=0, msg=key)
    omega = torch.cat([v.flatten() for k, v in ta.items() if "omega" in k])
    assert (omega - 1.0).abs().max() > 0.02  # ω starts at N(2/N, 0.001), N = 2: training moved it


def test_gradient_checkpointing_trains_the_same(setup, tmp_path):
    """``--gradient-checkpointing`` (the model's own, non-reentrant) recomputes the layers in the
    backward: the trained ω and head are those of a run without it."""
    from scalearn_fast.train.loop import checkpointing
    from scalearn_fast.train.stages import train_scalearn

    _, model_dir, sources = setup
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir)

    def on() -> bool:  # what transformers 4 and 5 both read (is_*_checkpointing)
        return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())

    checkpointing(model, True)
    assert on()
    checkpointing(model, False)
    assert not on()
    common = dict(
        model_dir=str(model_dir), device="cpu", max_train_samples=16, max_eval_samples=8, batch_size=8,
        max_length=32, max_steps=2, omega_dropout=0.0, lr=0.01, seed=0, progress=False, log=lambda s: None,
    )  # fmt: skip
    train_scalearn("mrpc", sources, tmp_path / "plain", **common)
    train_scalearn("mrpc", sources, tmp_path / "ckpt", gradient_checkpointing=True, **common)
    plain, ckpt = _tensors(tmp_path / "plain"), _tensors(tmp_path / "ckpt")
    assert plain.keys() == ckpt.keys()
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], atol=1e-6, rtol=0, msg=key)
    omega = torch.cat([v.flatten() for k, v in plain.items() if "omega" in k])
    assert (omega - 1.0).abs().max() > 0.005  # two steps at lr 1e-2 moved ω (N(1, 0.001) at the start)
