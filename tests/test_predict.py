"""``scalearn-fast predict``: one model, many tasks' requests in one TSV; each prediction equals
its task's single-task model; a bad row is reported with its line number, the others served."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="predict needs transformers")

from tiny_bert_folder import save_tiny_bert  # noqa: E402

from scalearn_fast import attach_scalearn, cli, load_scalearn, save_scalearn  # noqa: E402
from scalearn_fast.formats.adapterhub import AdapterWeights, save_adapterhub_adapter  # noqa: E402
from scalearn_fast.models import omega_parameters  # noqa: E402

D, R = 32, 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny BERT folder (the MiniLM's tokenizer), 3 source folders, and two task folders with
    different label counts (2 and 1: a regression head)."""
    root = tmp_path_factory.mktemp("predict")
    save_tiny_bert(root, hidden_size=D, dropout=False)
    g = torch.Generator().manual_seed(1)
    sources = []
    for i in range(3):
        layers = {
            f"bert.encoder.layer.{j}.output": AdapterWeights(
                torch.randn(R, D, generator=g) * 0.3,
                torch.randn(R, generator=g) * 0.1,
                torch.randn(D, R, generator=g) * 0.3,
                torch.randn(D, generator=g) * 0.1,
            )  # fmt: skip
            for j in range(2)
        }
        folder = root / "adapters" / f"src{i}"
        save_adapterhub_adapter(
            folder, f"src{i}", layers, model_type="bert", hidden_size=D, reduction_factor=D / R
        )
        sources.append(str(folder))
    tasks = {}
    for name, labels, variant in (("rte", 2, "scalearn"), ("stsb", 1, "scalearn_uniform++")):
        model = transformers.BertForSequenceClassification.from_pretrained(
            root, num_labels=labels, ignore_mismatched_sizes=True
        )
        attach_scalearn(model, sources, variant)
        with torch.no_grad():
            for omega in omega_parameters(model):
                omega.copy_(1 + torch.randn(omega.shape, generator=g))
            model.classifier.weight.normal_(0, 1.0, generator=g)
        save_scalearn(model, root / "out" / name)
        tasks[name] = (root / "out" / name, labels)
    return root, sources, tasks


REQUESTS = [
    ("rte", "the cat sat on the mat", "a cat is sitting"),
    ("stsb", "a man is playing a guitar", "a man plays music"),
    ("mrpc", "an unknown task", "is reported"),
    ("rte", "it rained all day", "the ground is dry"),
    ("stsb", "two dogs run", "dogs are running"),
]


def expected(root, sources, folder, labels, text, pair):
    tokenizer = transformers.AutoTokenizer.from_pretrained(root)
    model = transformers.BertForSequenceClassification.from_pretrained(
        root, num_labels=labels, ignore_mismatched_sizes=True
    )
    load_scalearn(model, folder, sources=sources, backend="torch")
    with torch.no_grad():
        logits = model.eval()(**tokenizer([text], [pair], return_tensors="pt")).logits[0]
    return logits


def test_predict_serves_every_task_and_reports_bad_rows(served, tmp_path, capsys):
    root, sources, tasks = served
    requests = tmp_path / "requests.tsv"
    requests.write_text("".join("\t".join(r) + "\n" for r in REQUESTS) + "\nrte\n")
    out = tmp_path / "pred.tsv"
    args = ["predict", "--model", str(root), "--sources", *sources, "--input", str(requests),
            "--output", str(out), "--batch-size", "3", "--no-progress", "--device", "cpu",
            "--backend", "torch", "--tasks", *(str(f) for f, _ in tasks.values())]  # fmt: skip
    status = cli.main(args)
    err = capsys.readouterr().err
    assert status == 1
    assert "line 3: unknown task 'mrpc'" in err and "line 7: expected task<TAB>text" in err
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0] == ["line", "task", "prediction"]
    assert [r[:2] for r in rows[1:]] == [["1", "rte"], ["2", "stsb"], ["4", "rte"], ["5", "stsb"]]
    for line, task, prediction in rows[1:]:
        folder, labels = tasks[task]
        _, text, pair = REQUESTS[int(line) - 1]
        ref = expected(root, sources, folder, labels, text, pair)
        if labels == 1:  # batched with padding: equal up to fp32 rounding
            assert abs(float(prediction) - ref[0].item()) <= 1e-4 * max(1.0, abs(ref[0].item()))
        else:
            assert int(prediction) == int(ref.argmax())


def test_predict_task_names_must_be_unique(served, tmp_path, capsys):
    root, sources, tasks = served
    folder = str(tasks["rte"][0])
    args = ["predict", "--sources", *sources, "--input", str(tmp_path / "x.tsv"), "--tasks", folder, folder]
    assert cli.main(args) == 2
    assert "names task 'rte' twice" in capsys.readouterr().err


def test_readme_predict_line_parses():
    """The README's ``predict`` line (an ``sh`` block) parses with the CLI as written."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"^```sh\n(.*?)^```", readme, flags=re.M | re.S)
    lines = [b.replace("\\\n", " ").strip() for b in blocks if "scalearn-fast predict" in b]
    assert len(lines) == 1
    args = cli.build_parser().parse_args(shlex.split(lines[0])[1:])
    assert args.command == "predict" and args.tasks == ["out/rte", "out/mrpc"]
