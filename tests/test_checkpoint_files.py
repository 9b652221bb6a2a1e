"""ScaLearn checkpoints as one unit: bad configs, missing head tensors, a mismatched pair of
files, killed saves; plus saving what attach_scalearn was given (recorded folders, one folder,
save_pretrained of a ++ variant)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF wrapper needs transformers")

from scalearn_fast import attach_scalearn, load_scalearn, save_scalearn  # noqa: E402
from scalearn_fast.formats import (  # noqa: E402
    ADAPTER_BIN,
    SCALEARN_CONFIG,
    SCALEARN_WEIGHTS,
    AdapterWeights,
    clean_stale_temps,
    load_adapterhub_source,
    read_safetensors,
    save_adapterhub_adapter,
)
from scalearn_fast.models import is_attached, omega_parameters  # noqa: E402

D, LAYERS, R = 32, 2, 8
ROOT = Path(__file__).resolve().parents[1]


def tiny_bert(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=2 * D, max_position_embeddings=32, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def random_sources(n: int = 3, seed: int = 1) -> dict[str, dict]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"src{i}": {
            layer: (
                torch.randn(R, D, generator=g) * 0.3,
                torch.randn(R, generator=g) * 0.1,
                torch.randn(D, R, generator=g) * 0.3,
                torch.randn(D, generator=g) * 0.1,
            )
            for layer in range(LAYERS)
        }
        for i in range(n)
    }


def adapter_folders(root: Path, n: int = 3) -> list[Path]:
    out = []
    for name, layers in random_sources(n).items():
        prefixed = {f"bert.encoder.layer.{i}.output": AdapterWeights(*w) for i, w in layers.items()}
        save_adapterhub_adapter(root / name, name, prefixed, model_type="bert", hidden_size=D,
                                reduction_factor=D / R)  # fmt: skip
        out.append(root / name)
    return out


def ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        return model.eval()(ids()).logits


def randomise(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for omega in omega_parameters(model):
            omega.copy_(torch.randn(omega.shape, generator=g))
        model.classifier.weight.normal_(0, 0.5, generator=g)


@pytest.fixture
def saved(tmp_path):
    model = attach_scalearn(tiny_bert(), random_sources(), backend="torch")
    randomise(model)
    folder = tmp_path / "ckpt"
    save_scalearn(model, folder, include_sources=True)
    return folder, model


def rewrite_weights(folder: Path, change) -> None:
    """Edit the tensors of a saved checkpoint, keeping its header (config) as it was."""
    from safetensors.torch import save_file

    tensors, metadata = read_safetensors(folder / SCALEARN_WEIGHTS)
    change(tensors)
    save_file(tensors, str(folder / SCALEARN_WEIGHTS), metadata=metadata)


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / SCALEARN_CONFIG).read_text())
    config = change(config)
    (folder / SCALEARN_CONFIG).write_text(json.dumps(config))


# ----------------------------------------------------------------------------- loaders


def _set(key, value):
    def change(config):
        config[key] = value
        return config

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: None, r"expected a JSON object, got NoneType"),
        (lambda c: 3, r"expected a JSON object, got int"),
        (lambda c: [c], r"expected a JSON object, got list"),
        (_set("source_names", None), r"source_names is None; expected a list of strings"),
        (_set("source_names", ["a", 1, "c"]), r"source_names is \['a', 1, 'c'\]"),
        (_set("num_sources", "3"), r"num_sources is '3'; expected a positive integer"),
        (_set("source_paths", ["/a", "/b"]), r"source_paths has 2 entries for 3 sources"),
        (_set("sites", [["encoder"], ["encoder", 1]]), r"sites is .*\[stack, layer index\] pairs"),
        (_set("sites", "encoder.0"), r"sites is .*\[stack, layer index\] pairs"),
        (_set("sites", [["encoder", "0"], ["encoder", 1]]), r"sites is .*\[stack, layer index\] pairs"),
        (_set("sites", [["middle", 0], ["encoder", 1]]), r"sites is .*\[stack, layer index\] pairs"),
        (_set("variant", "scalearn+"), r"variant 'scalearn\+' is not one of"),
        (_set("hidden_size", None), r"hidden_size is None"),
        (_set("activation", "swish"), r"activation must be one of"),
        (_set("omega_dropout", 1.5), r"omega_dropout is 1.5"),
        (_set("head", "classifier"), r"head is 'classifier'"),
        (_set("format_version", 99), r"format_version 99"),
    ],
)
def test_bad_configs_name_the_file_and_field(saved, change, message):
    folder, _ = saved
    edit_config(folder, change)
    model = tiny_bert()
    with pytest.raises(ValueError, match=message) as err:
        load_scalearn(model, folder)
    assert SCALEARN_CONFIG in str(err.value)
    assert not is_attached(model)


def test_stored_w_down_of_the_wrong_d_is_reported_as_w_down(saved):
    folder, _ = saved
    rewrite_weights(folder, lambda t: t.__setitem__("source.1.encoder.0.w_down", torch.zeros(R, D - 1)))
    message = r"stored source 1 \('src1'\) at encoder.0: w_down has shape \[8, 31\], expected \[r, 32\]"
    with pytest.raises(ValueError, match=message):
        load_scalearn(tiny_bert(), folder)


def test_stored_b_up_of_the_wrong_size(saved):
    folder, _ = saved
    rewrite_weights(folder, lambda t: t.__setitem__("source.0.encoder.1.b_up", torch.zeros(D + 1)))
    with pytest.raises(ValueError, match=r"b_up has shape \[33\], expected \[32\]"):
        load_scalearn(tiny_bert(), folder)


def test_sites_of_another_model_are_named(saved):
    folder, _ = saved
    edit_config(folder, _set("sites", [["encoder", 0], ["encoder", 2]]))
    rewrite_weights(folder, lambda t: None)  # header keeps the old sites: make the pair agree again
    tensors, metadata = read_safetensors(folder / SCALEARN_WEIGHTS)
    config = json.loads(metadata["config"])
    config["sites"] = [["encoder", 0], ["encoder", 2]]
    from safetensors.torch import save_file

    save_file(tensors, str(folder / SCALEARN_WEIGHTS), metadata=dict(metadata, config=json.dumps(config)))
    with pytest.raises(
        ValueError, match=r"the model lacks \['encoder.2'\], the checkpoint lacks \['encoder.1'\]"
    ):
        load_scalearn(tiny_bert(), folder)


def test_adapter_bin_holding_a_list(tmp_path):
    folder = adapter_folders(tmp_path, 1)[0]
    torch.save([torch.zeros(3)], folder / ADAPTER_BIN)
    with pytest.raises(
        ValueError, match=r"pytorch_adapter.bin: holds a list, expected a dict of named tensors"
    ):
        load_adapterhub_source(folder)


# ----------------------------------------------------------------------------- the head


def test_missing_head_tensors_fail(saved):
    folder, _ = saved
    rewrite_weights(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("head.")])
    model = tiny_bert(seed=9)
    with pytest.raises(
        ValueError, match=r"lacks 'head\.(bert\.pooler\.dense|classifier)\.\w+', which its config"
    ):
        load_scalearn(model, folder)
    assert not is_attached(model)
    load_scalearn(model, folder, load_head=False)  # the documented way to keep the model's head


def test_a_head_of_another_shape_is_refused(saved):
    folder, _ = saved
    with pytest.raises(ValueError, match=r"classifier.weight has shape \[3, 32\], expected \[5, 32\]"):
        load_scalearn(tiny_bert(num_labels=5), folder)


def test_round_trip_restores_the_head(saved):
    folder, model = saved
    fresh = load_scalearn(tiny_bert(), folder, backend="torch")  # head: the random one of the save
    torch.testing.assert_close(logits(fresh), logits(model), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- one unit


def test_the_config_travels_in_the_weights_file(saved):
    folder, _ = saved
    _, metadata = read_safetensors(folder / SCALEARN_WEIGHTS)
    assert json.loads(metadata["config"]) == json.loads((folder / SCALEARN_CONFIG).read_text())


def test_a_mismatched_pair_is_refused_and_a_new_save_repairs_it(tmp_path, monkeypatch):
    from scalearn_fast.formats import unit as fmt  # the writer ScaLearn checkpoints use

    folder = tmp_path / "ckpt"
    model = attach_scalearn(tiny_bert(), random_sources(), backend="torch")
    save_scalearn(model, folder, include_sources=True)
    other = attach_scalearn(tiny_bert(), random_sources(), "scalearn_uniform", backend="torch")
    randomise(other)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies between the two files

    monkeypatch.setattr(fmt, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save_scalearn(other, folder, include_sources=True)
    monkeypatch.undo()
    fresh = tiny_bert()
    with pytest.raises(ValueError, match=r"does not match the config stored in scalearn.safetensors "
                                         r"\(fields \['variant'\] differ\)"):  # fmt: skip
        load_scalearn(fresh, folder)
    assert not is_attached(fresh)
    save_scalearn(other, folder, include_sources=True)
    torch.testing.assert_close(logits(load_scalearn(fresh, folder, backend="torch")), logits(other))


def test_files_mixed_from_two_checkpoints_are_refused(tmp_path):
    a = attach_scalearn(tiny_bert(), random_sources(3), backend="torch")
    b = attach_scalearn(tiny_bert(), random_sources(2), backend="torch")
    save_scalearn(a, tmp_path / "a", include_sources=True)
    save_scalearn(b, tmp_path / "b", include_sources=True)
    (tmp_path / "a" / SCALEARN_WEIGHTS).write_bytes((tmp_path / "b" / SCALEARN_WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match="different saves"):
        load_scalearn(tiny_bert(), tmp_path / "a")


def test_a_legacy_checkpoint_without_a_header_config_loads(saved):
    from safetensors.torch import save_file

    folder, model = saved
    tensors, _ = read_safetensors(folder / SCALEARN_WEIGHTS)
    save_file(tensors, str(folder / SCALEARN_WEIGHTS), metadata={"format": "scalearn_fast"})
    torch.testing.assert_close(logits(load_scalearn(tiny_bert(), folder, backend="torch")), logits(model))


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_killed_writer_leaves_a_temp_that_the_next_load_and_save_remove(saved):
    folder, model = saved
    code = (
        "import os, sys, time, torch\n"
        "from scalearn_fast.formats import atomic\n"
        "def hang(*a):\n"
        "    print('written', flush=True); time.sleep(600)\n"
        "os.replace = hang\n"
        f"atomic.atomic_write_tensors({str(folder / SCALEARN_WEIGHTS)!r}, {{'x': torch.zeros(1000)}})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writer = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "written"  # the temp file is complete, not yet moved
        assert len(_hidden(folder)) == 1 and _hidden(folder)[0].startswith(f".{SCALEARN_WEIGHTS}.")
        assert clean_stale_temps(folder, [SCALEARN_WEIGHTS]) == []  # its writer still runs: keep it
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert len(_hidden(folder)) == 1  # the kill left it behind
    fresh = load_scalearn(tiny_bert(), folder, backend="torch")  # the old pair is intact
    torch.testing.assert_close(logits(fresh), logits(model))
    assert _hidden(folder) == []  # and the load removed the stale temp


def test_save_removes_stale_temps_and_keeps_a_live_writers(saved):
    folder, model = saved
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = folder / f".{SCALEARN_CONFIG}.{dead.pid}-dead.tmp"
    live = folder / f".{SCALEARN_WEIGHTS}.{os.getpid()}-live.tmp"
    legacy_old = folder / f".{SCALEARN_WEIGHTS}.abc123.tmp"  # no pid: removed once a day old
    unrelated = folder / ".keep"
    for p in (stale, live, legacy_old, unrelated):
        p.write_text("x")
    day = time.time() - 2 * 24 * 3600
    os.utime(legacy_old, (day, day))
    save_scalearn(model, folder, include_sources=True)
    assert _hidden(folder) == sorted([live.name, unrelated.name])


# ----------------------------------------------------------------------------- what attach was given


def test_save_records_the_folders_attach_was_given(tmp_path):
    folders = adapter_folders(tmp_path / "adapters")
    model = attach_scalearn(tiny_bert(), [str(f) for f in folders], backend="torch")
    randomise(model)
    save_scalearn(model, tmp_path / "out")  # no source_paths=
    config = json.loads((tmp_path / "out" / SCALEARN_CONFIG).read_text())
    assert config["source_paths"] == [str(f.resolve()) for f in folders]
    fresh = load_scalearn(tiny_bert(), tmp_path / "out", backend="torch")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=1e-5, atol=1e-6)
    save_scalearn(fresh, tmp_path / "again")  # a loaded model records them too
    assert (
        json.loads((tmp_path / "again" / SCALEARN_CONFIG).read_text())["source_paths"]
        == config["source_paths"]
    )


def test_source_paths_must_be_a_list(saved, tmp_path):
    _, model = saved
    with pytest.raises(ValueError, match="source_paths is one path"):
        save_scalearn(model, tmp_path / "x", source_paths="adapters/a")
    with pytest.raises(ValueError, match="source_paths has 2 entries for 3 sources"):
        save_scalearn(model, tmp_path / "x", source_paths=["a", "b"])


def test_one_folder_as_a_string_is_one_source(tmp_path):
    folder = adapter_folders(tmp_path / "adapters", 1)[0]
    model = attach_scalearn(tiny_bert(), str(folder), backend="torch")
    assert len(omega_parameters(model)) == LAYERS and omega_parameters(model)[0].shape == (1, D)
    with pytest.raises(
        ValueError, match=r"no adapter_config.json .* it holds adapter folders .* pass them as a list"
    ):
        attach_scalearn(tiny_bert(), str(tmp_path / "adapters"))


@pytest.mark.parametrize("variant", ["scalearn++", "scalearn_uniform++"])
def test_save_pretrained_of_a_shared_variant(variant, tmp_path):
    from safetensors.torch import load_file

    model = attach_scalearn(tiny_bert(), random_sources(), variant, backend="torch")
    randomise(model)
    model.save_pretrained(tmp_path)  # safetensors, no shared-tensor error
    state = load_file(str(tmp_path / "model.safetensors"))
    assert [k for k in state if k.endswith("omega")] == ["bert.encoder.layer.0.output.scalearn.omega"]
    fresh = attach_scalearn(tiny_bert(seed=7), random_sources(), variant, backend="torch")
    fresh.load_state_dict(state, strict=False)
    torch.testing.assert_close(logits(fresh), logits(model))


def test_a_reader_racing_a_writer_never_gets_a_mixed_pair(tmp_path):
    """A writer alternates two checkpoints of different N; every read either pairs a config with
    its own weights or fails with the mismatch error, never a silent mix."""
    import threading

    from scalearn_fast.formats import read_scalearn_checkpoint, write_scalearn_checkpoint

    def config(n):
        return {"variant": "scalearn", "num_sources": n, "source_names": [f"s{i}" for i in range(n)],
                "hidden_size": 4, "sites": [["encoder", 0]]}  # fmt: skip

    stop = threading.Event()

    def writer():
        n = 2
        while not stop.is_set():
            write_scalearn_checkpoint(tmp_path, config(n), {"omega.encoder.0": torch.full((n, 4), float(n))})
            n = 5 - n

    write_scalearn_checkpoint(tmp_path, config(2), {"omega.encoder.0": torch.full((2, 4), 2.0)})
    thread = threading.Thread(target=writer)
    thread.start()
    good = refused = 0
    try:
        for _ in range(100):
            try:
                ckpt = read_scalearn_checkpoint(tmp_path)
            except ValueError as err:
                assert "different saves" in str(err)
                refused += 1
                continue
            omega = ckpt.tensors["omega.encoder.0"]
            assert omega.shape[0] == ckpt.config["num_sources"] == int(omega[0, 0])
            good += 1
    finally:
        stop.set()
        thread.join()
    assert good > 0
