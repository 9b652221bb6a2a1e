"""``train-task-bank``: several targets trained in one run with mixed batches, each with its own head
and metric, written as per-target ScaLearn checkpoints that a task bank loads. A tiny random BERT
(MiniLM tokenizer files) on the shipped GLUE sample."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the training CLI needs transformers")

from tiny_bert_folder import save_tiny_bert  # noqa: E402

from scalearn_fast import cli  # noqa: E402

TINY = ["--max-train-samples", "12", "--max-eval-samples", "6", "--max-length", "24", "--batch-size", "6",
        "--no-progress", "--device", "cpu", "--seed", "0"]  # fmt: skip
TARGETS = ["rte", "sts-b", "cola"]  # pairs and single sentences, regression and classification


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two stage-1 sources, then one train-task-bank run over three targets."""
    root = tmp_path_factory.mktemp("bank-train")
    model = root / "tiny-bert"
    save_tiny_bert(model, head=False, dropout=False)  # no head: each run gets fresh ones
    common = ["--model", str(model), *TINY]
    for task in ("sst-2", "mrpc"):
        assert (
            cli.main(
                ["train-adapter", "--task", task, "--output", str(root / task), "--max-steps", "1", *common]
            )
            == 0
        )
    sources = [str(root / "sst-2"), str(root / "mrpc")]
    out = root / "bank"
    argv = ["train-task-bank", "--task", *TARGETS, "--sources", *sources, "--output", str(out),
            "--max-steps", "3", "--eval-every", "3", *common]  # fmt: skip
    assert cli.main(argv) == 0
    return {"model": model, "sources": sources, "out": out}


def _bank(run, targets=TARGETS):
    from scalearn_fast import attach_task_bank

    model = transformers.AutoModelForSequenceClassification.from_pretrained(run["model"]).eval()
    return attach_task_bank(model, run["sources"], {t: run["out"] / t for t in targets})


def test_run_writes_one_loadable_checkpoint_per_target(run):
    from scalearn_fast import load_scalearn
    from scalearn_fast.models import num_labels

    results = json.loads((run["out"] / "results.json").read_text())
    assert results["targets"] == TARGETS and results["steps"] == 3
    best = results["best_dev"]
    for metric in ("rte/accuracy", "sts-b/pearson", "cola/matthews", "main"):
        assert metric in best, sorted(best)
    assert best["main"] == pytest.approx((best["rte/main"] + best["sts-b/main"] + best["cola/main"]) / 3)
    bank = _bank(run)
    assert [num_labels(bank, t) for t in TARGETS] == [2, 1, 2]
    ids = torch.randint(1000, 2000, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = bank(input_ids=ids, task=TARGETS).logits
        for b, task in enumerate(TARGETS):  # each target alone, loaded by load_scalearn
            labels = 1 if task == "sts-b" else 2
            alone = transformers.AutoModelForSequenceClassification.from_pretrained(
                run["model"], num_labels=labels
            )
            alone = load_scalearn(alone.eval(), run["out"] / task).eval()
            want = alone(input_ids=ids[b : b + 1]).logits[0]
            torch.testing.assert_close(mixed[b, :labels], want, rtol=1e-5, atol=1e-6)


def test_add_task_loads_a_trained_target(run):
    from scalearn_fast.models import add_task, task_names

    bank = _bank(run, ["rte"])
    add_task(bank, "cola", run["out"] / "cola")
    assert task_names(bank) == ["rte", "cola"]


def test_mixed_batch_loss_gradient_is_the_sum_of_per_target_gradients(run):
    from scalearn_fast.models import task_bank_parameters
    from scalearn_fast.train.task_bank import multi_task_loss

    bank = _bank(run)
    params = task_bank_parameters(bank)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (6, 9), generator=g)
    task = torch.tensor([0, 1, 2, 2, 0, 1])
    labels = torch.tensor([1.0, 3.5, 0.0, 1.0, 0.0, 2.0])

    def grads(rows):
        logits = bank(input_ids=ids[rows], task=task[rows]).logits
        loss = multi_task_loss(logits, labels[rows], task[rows], TARGETS)
        return torch.autograd.grad(loss, params, allow_unused=True)

    mixed = grads(torch.arange(6))
    per_task = [grads(torch.nonzero(task == k).squeeze(1)) for k in range(3)]
    for i, p in enumerate(params):
        want = sum(torch.zeros_like(p) if gs[i] is None else gs[i] for gs in per_task)
        got = torch.zeros_like(p) if mixed[i] is None else mixed[i]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_cli_refuses_a_target_named_twice(tmp_path, capsys):
    code = cli.main(["train-task-bank", "--task", "rte", "RTE", "--sources", str(tmp_path), "--output",
                     str(tmp_path / "o"), "--device", "cpu"])  # fmt: skip
    assert code != 0
    assert "targets name a task twice" in capsys.readouterr().err


def test_cli_refuses_data_dir(tmp_path, capsys):
    """``--data-dir`` (a translation option shared by the training commands) is refused by name,
    not passed on to the training config."""
    code = cli.main(["train-task-bank", "--task", "rte", "mrpc", "--sources", str(tmp_path), "--output",
                     str(tmp_path / "o"), "--device", "cpu", "--data-dir", str(tmp_path)])  # fmt: skip
    assert code == 2
    assert "--data-dir is for --task translation" in capsys.readouterr().err
