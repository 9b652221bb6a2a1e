"""The paper's protocol in the CLI: ``--include-target`` (the target's own adapter among the
sources, last), ``--recipe paper`` (the official runs' settings; explicit options win) and
``train-fusion`` (AdapterFusion over the same sources, written in the library's format and
loadable). Tiny runs on the GLUE sample shipped with the package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the training CLI needs transformers")

from tiny_bert_folder import save_tiny_bert  # noqa: E402

from scalearn_fast import attach_fusion, cli  # noqa: E402
from scalearn_fast.formats.adapterhub import AdapterWeights, save_adapterhub_adapter  # noqa: E402
from scalearn_fast.train.protocol import apply_recipe  # noqa: E402

D, LAYERS = 32, 2
TINY_RUN = ["--max-train-samples", "16", "--max-eval-samples", "8", "--max-length", "32", "--batch-size", "8",
            "--no-progress", "--device", "cpu", "--seed", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A BERT (d=D, LAYERS layers) with the MiniLM's tokenizer files, saved as a local HF folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    save_tiny_bert(folder, hidden_size=D, layers=LAYERS)
    return folder


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> dict[str, Path]:
    """Stage-1-like adapter folders (random weights) named after GLUE tasks."""
    root = tmp_path_factory.mktemp("adapters")
    g = torch.Generator().manual_seed(1)
    out = {}
    for name in ("rte", "mnli", "sst-2"):
        layers = {
            f"bert.encoder.layer.{i}.output": AdapterWeights(
                torch.randn(4, D, generator=g) * 0.3, torch.zeros(4), torch.randn(D, 4, generator=g) * 0.3,
                torch.zeros(D),
            )
            for i in range(LAYERS)
        }  # fmt: skip
        out[name] = save_adapterhub_adapter(root / name, name, layers, model_type="bert", hidden_size=D,
                                            reduction_factor=8)  # fmt: skip
    return out


def _parse(argv: list[str]):
    return cli.build_parser().parse_args(argv)


def test_recipe_sets_the_official_values_and_explicit_options_win():
    base = ["--task", "rte", "--output", "x", "--device", "cpu", "--recipe", "paper"]
    a = apply_recipe(_parse(["train-scalearn", *base, "--sources", "s", "--lr", "1e-3"]), "train-scalearn")
    assert (a.lr, a.epochs, a.patience, a.batch_size, a.max_length, a.eval_every) == (
        1e-3,
        30.0,
        30,
        32,
        128,
        None,
    )
    assert a.fp16 is False  # no GPU asked for: fp16 only where the device is one
    a = apply_recipe(_parse(["train-fusion", *base, "--sources", "s", "--patience", "2"]), "train-fusion")
    assert (a.lr, a.epochs, a.patience, a.batch_size) == (5e-5, 30.0, 2, 32)
    a = apply_recipe(_parse(["train-adapter", *base]), "train-adapter")
    assert (a.lr, a.epochs, a.patience) == (3e-4, 30.0, 5)
    a = apply_recipe(
        _parse(["train-adapter", *base[:-2], "--device", "cuda:1", "--recipe", "paper"]), "train-adapter"
    )
    assert a.fp16 is True
    plain = _parse(["train-scalearn", "--task", "rte", "--output", "x", "--sources", "s"])
    assert (apply_recipe(plain, "train-scalearn").lr, plain.epochs, plain.patience, plain.fp16) == (
        6e-3,
        1.0,
        3,
        False,
    )
    assert _parse(["train-fusion", "--task", "rte", "--output", "x", "--sources", "s"]).lr == 5e-5


def test_include_target_puts_the_target_last(tiny_model, adapters_dir, tmp_path, capsys):
    common = ["--task", "rte", "--model", str(tiny_model), "--max-steps", "1", *TINY_RUN]
    srcs = [str(adapters_dir[n]) for n in ("rte", "mnli", "sst-2")]
    assert cli.main(["train-scalearn", *common, "--sources", *srcs, "--include-target",
                     "--output", str(tmp_path / "moved")]) == 0  # fmt: skip
    results = json.loads((tmp_path / "moved" / "results.json").read_text())
    assert results["sources"] == ["mnli", "sst-2", "rte"]
    config = json.loads((tmp_path / "moved" / "scalearn_config.json").read_text())
    assert config["source_names"] == ["mnli", "sst-2", "rte"]

    # a folder is appended; a source of the same name is refused; no own adapter is named
    assert cli.main(["train-scalearn", *common, "--sources", *srcs[1:], "--include-target", srcs[0],
                     "--output", str(tmp_path / "appended")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "appended" / "results.json").read_text())["sources"] == [
        "mnli",
        "sst-2",
        "rte",
    ]
    capsys.readouterr()
    assert cli.main(["train-scalearn", *common, "--sources", *srcs, "--include-target", srcs[0],
                     "--output", str(tmp_path / "twice")]) == 2  # fmt: skip
    assert "already among the sources" in capsys.readouterr().err
    assert cli.main(["train-scalearn", *common, "--sources", *srcs[1:], "--include-target",
                     "--output", str(tmp_path / "none")]) == 2  # fmt: skip
    assert "no source is named 'rte'" in capsys.readouterr().err
    assert cli.main(["train-scalearn", *common, "--sources", *srcs, "--fp16",
                     "--output", str(tmp_path / "fp16")]) == 2  # fmt: skip
    assert "fp16 training needs a CUDA device" in capsys.readouterr().err


def test_train_fusion_writes_a_loadable_fusion_and_its_metric(tiny_model, adapters_dir, tmp_path):
    from scalearn_fast.formats.files import read_safetensors
    from scalearn_fast.train.data import read_glue
    from scalearn_fast.train.loop import evaluate
    from scalearn_fast.train.stages import load_model

    out = tmp_path / "fusion"
    srcs = [str(adapters_dir[n]) for n in ("mnli", "sst-2")]
    code = cli.main(["train-fusion", "--task", "rte", "--model", str(tiny_model), "--sources", *srcs,
                     "--include-target", str(adapters_dir["rte"]), "--epochs", "2", "--max-steps", "3",
                     "--eval-every", "1", "--lr", "1e-2", "--output", str(out), *TINY_RUN])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "adapter_fusion" and results["sources"] == ["mnli", "sst-2", "rte"]
    assert results["config"]["lr"] == 1e-2 and len(results["history"]) == 3
    meta = json.loads((out / "adapter_fusion_config.json").read_text())
    assert meta["name"] == "mnli,sst-2,rte" and meta["config"]["value"] is True

    # the folder loads (the library's format) with the head, to the recorded best dev metric
    model, tokenizer = load_model(str(tiny_model), "rte")
    attach_fusion(model, {n: adapters_dir[n] for n in ("mnli", "sst-2", "rte")}, out, backend="torch")
    head = read_safetensors(out / "task_head.safetensors")[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in head:
                p.copy_(head[name])
    dev = read_glue("rte", "dev", max_samples=8, seed=3)
    again = evaluate(model, dev, tokenizer, "rte", max_length=32)
    assert again["main"] == pytest.approx(results["best_dev"]["main"])
    fresh = torch.full((D, D), 1e-6).fill_diagonal_(1.0)
    value = read_safetensors(out / "model_adapter_fusion.safetensors")[0][
        "bert.encoder.layer.0.output.adapter_fusion_layer.mnli,sst-2,rte.value.weight"
    ]
    assert not torch.equal(value, fresh)  # the fusion trained
