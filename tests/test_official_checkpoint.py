"""ScaLearn folders of the official ScaLearn code (CPJKU/ScaLearn's adapter-transformers fork):
``load_scalearn`` reads them, ``++`` folders without ω are refused, ``convert`` writes our format.

``write_official`` transcribes the official saver (``ScaLearnLoader.save`` with
``WeightsLoaderHelper``) without running it:
- files: ``scalearn_config.json`` (``json.dump(indent=2, sort_keys=True)``) and
  ``pytorch_model_scalearn.bin`` (``torch.save`` of a plain dict of tensors);
- config keys (``build_full_config``): ``model_type``, ``hidden_size``, ``name`` (the source names
  joined by commas, ω's row order), ``model_name``, ``model_class``, ``config`` (the ScaLearn
  config's fields: ``learn_omega``, ``omega_shape`` "vector"/"scalar", ``per_layer``,
  ``dropout_ratio``, ``residual``, ``take_mean``, ``take_softmax``, ...), ``version``;
- weights: the model state-dict entries whose key contains ``scalearn_layer.``:
  ``bert.encoder.layer.{l}.output.scalearn_layer.{name}.omega``, ``[N, d]`` (vector) or
  ``[N, 1]`` (scalar). The ``++`` variants keep their one ω at ``bert.shared_parameters.{name}
  .omega``, which that filter misses, so their file holds no tensor at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from scalearn_fast import attach_scalearn, load_scalearn  # noqa: E402
from scalearn_fast.cli import main  # noqa: E402
from scalearn_fast.formats.adapterhub import AdapterWeights, save_adapterhub_adapter  # noqa: E402
from scalearn_fast.formats.scalearn import read_scalearn_config  # noqa: E402
from scalearn_fast.models.scalearn import attach_state, scalearn_layers  # noqa: E402

D, R, LAYERS = 16, 4, 2
NAMES = ["mnli", "sst2", "rte"]  # the target (rte) last, as the official GLUE runs order them
VARIANTS = {  # ours -> the official config's (omega_shape, per_layer)
    "scalearn": ("vector", False),
    "scalearn_uniform": ("scalar", False),
    "scalearn++": ("vector", True),
    "scalearn_uniform++": ("scalar", True),
}


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def inputs():
    g = torch.Generator().manual_seed(5)
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=g)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Three AdapterHub folders (as the official stage-1 runs save them)."""
    root = tmp_path_factory.mktemp("sources")
    g = torch.Generator().manual_seed(1)
    out = {}
    for name in NAMES:
        layers = {
            f"bert.encoder.layer.{i}.output": AdapterWeights(
                torch.randn(R, D, generator=g) * 0.3, torch.randn(R, generator=g) * 0.1,
                torch.randn(D, R, generator=g) * 0.3, torch.randn(D, generator=g) * 0.1,
            )
            for i in range(LAYERS)
        }  # fmt: skip
        out[name] = save_adapterhub_adapter(
            root / name, name, layers, model_type="bert", hidden_size=D, reduction_factor=D / R
        )
    return out


def official_omega(variant: str) -> dict[str, torch.Tensor]:
    """Random trained-looking ω: per layer, or the one shared ω (key ``shared``)."""
    shape, per_layer = VARIANTS[variant]
    cols = D if shape == "vector" else 1
    g = torch.Generator().manual_seed(7)
    if per_layer:
        return {"shared": torch.randn(len(NAMES), cols, generator=g)}
    return {str(i): torch.randn(len(NAMES), cols, generator=g) for i in range(LAYERS)}


def write_official(folder: Path, variant: str, omega: dict[str, torch.Tensor], **config_changes) -> Path:
    """The two files the official ``model.save_scalearn(folder, "mnli,sst2,rte")`` writes."""
    shape, per_layer = VARIANTS[variant]
    name = ",".join(NAMES)
    scalearn_config = {
        "architecture": None, "query_before_ln": False, "qqp": None, "mnli": None, "qnli": None,
        "cb": None, "copa": None, "rte": None, "mrpc": None, "wic": None, "wsc": None, "sst2": None,
        "stsb": None, "boolq": None, "learn_omega": True, "omega_shape": shape, "omega_init_type": "avg",
        "omega_init_scale": 2.0, "residual": True, "dropout_ratio": 0.3, "per_layer": per_layer,
        "regularization": False, "lambda_reg": 0.0, "take_mean": False, "take_softmax": False,
    }  # fmt: skip
    scalearn_config.update(config_changes)
    meta = {
        "model_type": "bert", "hidden_size": D, "name": name, "model_name": "bert-base-uncased",
        "model_class": "BertForSequenceClassification", "config": scalearn_config, "version": "3.2.1",
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "scalearn_config.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    # state-dict entries with "scalearn_layer." in the key: none for the ++ variants
    state = {
        f"bert.encoder.layer.{layer}.output.scalearn_layer.{name}.omega": w
        for layer, w in omega.items()
        if layer != "shared"
    }
    torch.save(state, folder / "pytorch_model_scalearn.bin")
    return folder


def reference(sources, variant: str, omega: dict[str, torch.Tensor]):
    """attach_scalearn with the same ω set directly."""
    model = attach_scalearn(tiny_bert(), sources, variant, backend="torch", omega_dropout=0.3).eval()
    with torch.no_grad():
        if "shared" in omega:
            attach_state(model).shared_omega.copy_(omega["shared"])
        else:
            for i, layer in enumerate(scalearn_layers(model)):
                layer.omega.copy_(omega[str(i)])
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_folder_loads_and_matches_attach(variant, sources, tmp_path):
    omega = official_omega(variant)
    folder = write_official(tmp_path / "official", variant, omega)
    expect = logits(reference(sources, variant, omega))
    plain = logits(tiny_bert())
    assert not torch.allclose(expect, plain, atol=1e-3)  # ω does something

    shared = variant.endswith("++")
    kwargs = {"omega": omega["shared"]} if shared else {}
    model = load_scalearn(tiny_bert(), folder, sources, backend="torch", **kwargs).eval()
    assert attach_state(model).variant == variant
    assert attach_state(model).source_names == NAMES
    assert scalearn_layers(model)[0].omega_dropout == 0.3  # the official dropout_ratio
    torch.testing.assert_close(logits(model), expect, rtol=1e-6, atol=1e-6)

    # convert writes our format; it loads (sources recorded) to the same outputs
    out = tmp_path / "ours"
    args = ["convert", str(folder), str(out), "--sources", *(f"{n}={p}" for n, p in sources.items())]
    if shared:
        torch.save({"omega": omega["shared"]}, tmp_path / "omega.pt")
        args += ["--omega", str(tmp_path / "omega.pt")]
    assert main(args) == 0
    assert read_scalearn_config(out)["variant"] == variant
    again = load_scalearn(tiny_bert(), out, backend="torch").eval()
    torch.testing.assert_close(logits(again), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["scalearn++", "scalearn_uniform++"])
def test_plus_plus_folder_without_omega_is_refused(variant, sources, tmp_path, capsys):
    folder = write_official(tmp_path / "official", variant, official_omega(variant))
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"holds no ω.*shared_parameters.*Pass the trained ω"):
        load_scalearn(model, folder, sources)
    assert not hasattr(model.bert.encoder.layer[0].output, "scalearn")  # nothing attached
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 2
    assert "holds no ω" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    cols = D if variant == "scalearn++" else 1
    with pytest.raises(ValueError, match=rf"omega has shape \[2, {cols}\].*expected \[3, {cols}\]"):
        load_scalearn(tiny_bert(), folder, sources, omega=torch.zeros(2, cols))


def test_bad_official_folders(sources, tmp_path):
    omega = official_omega("scalearn")
    good = write_official(tmp_path / "good", "scalearn", omega)
    with pytest.raises(ValueError, match=r"records no source folders; pass sources="):
        load_scalearn(tiny_bert(), good)
    with pytest.raises(ValueError, match=r"omega= is only for \+\+ folders"):
        load_scalearn(tiny_bert(), good, sources, omega=torch.zeros(3, D))
    with pytest.raises(ValueError, match=r"source names \['mnli', 'sst2', 'rte'\] \(in order\) do not match"):
        load_scalearn(tiny_bert(), good, dict(reversed(list(sources.items()))))
    for change, message in [
        ({"take_softmax": True}, "take_softmax=true"),
        ({"learn_omega": False}, "learn_omega is false"),
        ({"omega_shape": "matrix"}, "omega_shape is 'matrix'"),
    ]:
        bad = write_official(tmp_path / message.split()[0], "scalearn", omega, **change)
        with pytest.raises(ValueError, match=message):
            load_scalearn(tiny_bert(), bad, sources)
    wrong = write_official(tmp_path / "wrong", "scalearn", {"0": omega["0"][:, :3], "1": omega["1"]})
    with pytest.raises(ValueError, match=r"has shape \[3, 3\].*expected \[3, 16\]"):
        load_scalearn(tiny_bert(), wrong, sources)
    # a pickle holding more than tensors is refused (weights_only)
    torch.save({"x": object()}, good / "pytorch_model_scalearn.bin")
    with pytest.raises(ValueError, match="pickled Python objects"):
        load_scalearn(tiny_bert(), good, sources)
