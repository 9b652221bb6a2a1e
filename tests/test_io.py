"""AdapterHub-format I/O and ScaLearn checkpoints: round trips, the `adapters` library's own
files both ways, and clear errors for files that do not fit."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF wrapper needs transformers")

from scalearn_fast import attach_scalearn, load_adapterhub_sources, load_scalearn, save_scalearn  # noqa: E402
from scalearn_fast.io import (  # noqa: E402
    ADAPTER_BIN,
    ADAPTER_CONFIG,
    SCALEARN_CONFIG,
    SCALEARN_WEIGHTS,
    adapter_from_state_dict,
    atomic_write_json,
    load_adapterhub_source,
)
from scalearn_fast.models.scalearn import attach_state, omega_parameters  # noqa: E402
from scalearn_fast.train.adapter import attach_bottleneck_adapters, save_bottleneck_adapters  # noqa: E402

D, LAYERS, R = 32, 2, 8


def tiny_bert(seed: int = 0, hidden: int = D, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def random_sources(n: int, hidden: int = D, seed: int = 1) -> dict[str, dict]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        out[f"src{i}"] = {
            layer: (
                torch.randn(R, hidden, generator=g) * 0.3,
                torch.randn(R, generator=g) * 0.1,
                torch.randn(hidden, R, generator=g) * 0.3,
                torch.randn(hidden, generator=g) * 0.1,
            )
            for layer in range(LAYERS)
        }
    return out


def inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def randomise_omega_and_head(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for omega in omega_parameters(model):
            omega.copy_(torch.randn(omega.shape, generator=g))
        model.classifier.weight.normal_(0, 0.5, generator=g)


# --------------------------------------------------------------------------------------------
# ScaLearn checkpoints


@pytest.mark.parametrize("variant", ["scalearn", "scalearn_uniform", "scalearn++", "scalearn_uniform++"])
def test_save_load_round_trip(variant, tmp_path):
    sources = random_sources(3)
    model = attach_scalearn(tiny_bert(), sources, variant, backend="torch")
    randomise_omega_and_head(model)
    model.eval()
    with torch.no_grad():
        expect = model(**inputs()).logits
    save_scalearn(model, tmp_path, include_sources=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SCALEARN_CONFIG, SCALEARN_WEIGHTS])

    fresh = load_scalearn(tiny_bert(), tmp_path, backend="torch").eval()  # sources from the file
    with torch.no_grad():
        got = fresh(**inputs()).logits
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    assert attach_state(fresh).variant == variant
    shared = variant.endswith("++")
    assert len(omega_parameters(fresh)) == (1 if shared else LAYERS)

    # the same with the sources passed in again
    again = load_scalearn(tiny_bert(), tmp_path, sources, backend="torch").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs()).logits, expect, rtol=1e-5, atol=1e-6)


def test_shared_omega_is_saved_from_the_layers(tmp_path):
    """load_state_dict(assign=True) gives each layer its own ω Parameter: save what the layers
    hold (when they agree), and refuse when they no longer agree."""
    model = attach_scalearn(tiny_bert(), random_sources(2), "scalearn++", backend="torch")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in state:
        if k.endswith("scalearn.omega"):
            state[k] = torch.full_like(state[k], 0.125)
    model.load_state_dict(state, assign=True)
    save_scalearn(model, tmp_path)
    fresh = load_scalearn(tiny_bert(), tmp_path, random_sources(2), backend="torch")
    torch.testing.assert_close(omega_parameters(fresh)[0], torch.full_like(omega_parameters(fresh)[0], 0.125))
    with torch.no_grad():
        omega_parameters(model)[-1].add_(1.0)  # the layers' copies now differ
    with pytest.raises(ValueError, match=r"scalearn\+\+ shares one omega across layers, but layer 1"):
        save_scalearn(model, tmp_path / "again")


def test_load_without_head_keeps_fresh_head(tmp_path):
    model = attach_scalearn(tiny_bert(), random_sources(2), "scalearn", backend="torch")
    randomise_omega_and_head(model)
    save_scalearn(model, tmp_path, include_sources=True)
    fresh = tiny_bert(seed=9)
    before = fresh.classifier.weight.detach().clone()
    load_scalearn(fresh, tmp_path, load_head=False)
    torch.testing.assert_close(fresh.classifier.weight, before)
    torch.testing.assert_close(omega_parameters(fresh)[0], omega_parameters(model)[0])


@pytest.fixture
def saved(tmp_path):
    sources = random_sources(3)
    model = attach_scalearn(tiny_bert(), sources, "scalearn", backend="torch")
    randomise_omega_and_head(model)
    save_scalearn(model, tmp_path)
    return tmp_path, sources


def test_wrong_number_of_sources(saved):
    folder, sources = saved
    two = {k: sources[k] for k in ("src0", "src1")}
    with pytest.raises(ValueError, match=r"N=3 sources .* got N=2"):
        load_scalearn(tiny_bert(), folder, two)


def test_wrong_source_names(saved):
    folder, sources = saved
    renamed = {"a" if k == "src0" else k: v for k, v in sources.items()}
    with pytest.raises(ValueError, match="source names"):
        load_scalearn(tiny_bert(), folder, renamed)
    reordered = {k: sources[k] for k in ("src1", "src0", "src2")}
    with pytest.raises(ValueError, match="in order"):
        load_scalearn(tiny_bert(), folder, reordered)


def test_wrong_hidden_size(saved):
    folder, _ = saved
    with pytest.raises(ValueError, match=r"hidden size d=32, the model has d=48"):
        load_scalearn(tiny_bert(hidden=48), folder, random_sources(3, hidden=48))


def test_sources_neither_stored_nor_recorded(saved):
    folder, _ = saved
    with pytest.raises(ValueError, match="neither stored nor recorded"):
        load_scalearn(tiny_bert(), folder)


def test_corrupt_weights_file(saved):
    folder, sources = saved
    data = (folder / SCALEARN_WEIGHTS).read_bytes()
    (folder / SCALEARN_WEIGHTS).write_bytes(data[: len(data) // 2])
    model = tiny_bert()
    with pytest.raises(ValueError, match="cannot read weights"):
        load_scalearn(model, folder, sources)
    assert not hasattr(model.bert.encoder.layer[0].output, "scalearn")  # nothing left attached


def test_corrupt_config(saved):
    folder, sources = saved
    (folder / SCALEARN_CONFIG).write_text('{"variant": "scalearn", ')
    with pytest.raises(ValueError, match="corrupt JSON"):
        load_scalearn(tiny_bert(), folder, sources)


def test_omega_of_wrong_shape_in_file(saved):
    """A weights file whose ω does not match its own config (N or d) is refused and nothing stays attached."""
    from safetensors.torch import load_file, save_file

    folder, sources = saved
    tensors = load_file(str(folder / SCALEARN_WEIGHTS))
    tensors["omega.encoder.1"] = torch.zeros(2, D)
    save_file(tensors, str(folder / SCALEARN_WEIGHTS))
    model = tiny_bert()
    with pytest.raises(
        ValueError, match=r"omega.encoder.1 has shape \[2, 32\], expected \[3, 32\] \(wrong N"
    ):
        load_scalearn(model, folder, sources)
    assert not hasattr(model.bert.encoder.layer[1].output, "scalearn")
    # and the model still runs as the plain model
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs()).logits, tiny_bert()(**inputs()).logits)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_saving_one_weights_format_removes_a_stale_file_of_the_other(tmp_path):
    from scalearn_fast.io import ADAPTER_SAFE, AdapterWeights, save_adapterhub_adapter

    def save(seed, safetensors):
        layers = {
            f"bert.encoder.layer.{i}.output": AdapterWeights(*w)
            for i, w in random_sources(1, seed=seed)["src0"].items()
        }
        save_adapterhub_adapter(
            tmp_path,
            "a",
            layers,
            model_type="bert",
            hidden_size=D,
            reduction_factor=D / R,
            safetensors=safetensors,
        )
        return layers

    save(1, safetensors=True)
    fresh = save(2, safetensors=False)  # a later stage-1 run into the same folder
    assert not (tmp_path / ADAPTER_SAFE).exists() and (tmp_path / ADAPTER_BIN).exists()
    loaded = load_adapterhub_source(tmp_path)
    first = next(iter(loaded.layers.values()))
    torch.testing.assert_close(first.w_down, fresh["bert.encoder.layer.0.output"].w_down)


def test_atomic_write_gives_the_mode_a_plain_write_would(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "x.json", {"v": 1})
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    assert (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------------------------
# AdapterHub format


def state_dict_for(name: str, weights: dict, prefix: str = "bert.encoder.layer") -> dict[str, torch.Tensor]:
    out = {}
    for layer, (wd, bd, wu, bu) in weights.items():
        base = f"{prefix}.{layer}.output.adapters.{name}"
        out.update(
            {
                f"{base}.adapter_down.0.weight": wd,
                f"{base}.adapter_down.0.bias": bd,
                f"{base}.adapter_up.weight": wu,
                f"{base}.adapter_up.bias": bu,
            }
        )
    return out


def test_state_dict_parsing_and_scaling_fold():
    weights = random_sources(1)["src0"]
    src = adapter_from_state_dict(state_dict_for("a", weights), config={"scaling": 2.0})
    assert src.name == "a" and sorted(src.layers) == [("encoder", 0), ("encoder", 1)]
    wd, bd, wu, bu = weights[1]
    got = src.layers[("encoder", 1)]
    torch.testing.assert_close(got.w_down, wd)
    torch.testing.assert_close(got.w_up, 2.0 * wu)
    torch.testing.assert_close(got.b_up, 2.0 * bu)


def test_adapter_name_with_a_dot():
    src = adapter_from_state_dict(state_dict_for("glue.rte", random_sources(1)["src0"]))
    assert src.name == "glue.rte" and len(src.layers) == LAYERS


def test_bart_keys_parse_to_encoder_and_decoder_sites():
    w = random_sources(1)["src0"][0]
    state = {}
    for stack in ("encoder", "decoder"):
        base = f"model.{stack}.layers.0.output_adapters.adapters.x"
        state.update(
            {
                f"{base}.adapter_down.0.weight": w[0],
                f"{base}.adapter_down.0.bias": w[1],
                f"{base}.adapter_up.weight": w[2],
                f"{base}.adapter_up.bias": w[3],
            }
        )
    assert sorted(adapter_from_state_dict(state).layers) == [("decoder", 0), ("encoder", 0)]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"mh_adapter": True}, "mh_adapter"),
        ({"use_gating": True}, "use_gating"),
        ({"ln_after": True}, "ln_after"),
        ({"non_linearity": "leakyrelu"}, "non_linearity"),
        ({"scaling": "learned"}, "scaling"),
        ({"inv_adapter": "nice", "inv_adapter_reduction_factor": 2}, "inv_adapter='nice'"),
        ({"cross_adapter": True}, "cross_adapter"),
    ],
)
def test_non_pfeiffer_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        adapter_from_state_dict(state_dict_for("a", random_sources(1)["src0"]), config=config)


def test_attention_adapter_keys_are_refused():
    state = state_dict_for("a", random_sources(1)["src0"])
    state = {k.replace(".output.adapters", ".attention.output.adapters"): v for k, v in state.items()}
    with pytest.raises(ValueError, match="not an FFN-output adapter"):
        adapter_from_state_dict(state)


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_adapterhub_source(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"name": "a", "config": {}}))
    with pytest.raises(ValueError, match="neither"):
        load_adapterhub_source(tmp_path)
    (tmp_path / ADAPTER_BIN).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_adapterhub_source(tmp_path)
    torch.save(state_dict_for("a", random_sources(1)["src0"]), tmp_path / ADAPTER_BIN)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"name": "a", "config": {}, "hidden_size": 99}))
    with pytest.raises(ValueError, match="hidden_size 99"):
        load_adapterhub_source(tmp_path)


def test_duplicate_source_names(tmp_path):
    state = state_dict_for("a", random_sources(1)["src0"])
    with pytest.raises(ValueError, match="unique"):
        load_adapterhub_sources([state, state])


def import_adapters():
    """The optional `adapters` library, or a skip (absent, or not importable with this transformers)."""
    try:
        import adapters
    except ImportError as err:
        pytest.skip(f"the optional `adapters` library is not importable here: {err}")
    return adapters


def _library_model(seed: int, kind: str):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    common = dict(
        vocab_size=64,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=2 * D,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if kind == "bert":
        return BertModel(BertConfig(**common)).eval()
    return RobertaModel(RobertaConfig(pad_token_id=1, **common)).eval()


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_library_files_load_here(kind, tmp_path):
    """`adapters` save_adapter folders (.bin and safetensors) load with the library's exact weights."""
    adapters = import_adapters()
    model = _library_model(0, kind)
    adapters.init(model)
    model.add_adapter("a", config=adapters.SeqBnConfig(reduction_factor=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters.a." in name:
                p.normal_(0, 0.2)
    model.save_adapter(str(tmp_path / "bin"), "a")
    model.save_adapter(str(tmp_path / "safe"), "a", use_safetensors=True)
    assert (tmp_path / "safe" / "adapter.safetensors").is_file()
    library = {k: v for k, v in model.state_dict().items() if ".adapters.a." in k}
    for folder in ("bin", "safe"):
        src = load_adapterhub_source(tmp_path / folder)
        assert src.name == "a" and sorted(src.layers) == [("encoder", i) for i in range(LAYERS)]
        for (_, layer), w in src.layers.items():
            key = f"encoder.layer.{layer}.output.adapters.a"
            torch.testing.assert_close(w.w_down, library[f"{key}.adapter_down.0.weight"], rtol=0, atol=0)
            torch.testing.assert_close(w.b_up, library[f"{key}.adapter_up.bias"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_stage1_adapter_loads_in_library_with_same_outputs(kind, tmp_path):
    """What train-adapter writes is a valid AdapterHub adapter: `adapters` loads it and, with it
    active, the model computes what our stage-1 module computed."""
    adapters = import_adapters()
    ours = _library_model(0, kind).double()
    ours_adapters = attach_bottleneck_adapters(ours, reduction_factor=4, seed=0)
    with torch.no_grad():
        for a in ours_adapters:
            for p in a.parameters():
                p.normal_(0, 0.2)  # non-zero biases too
                p.copy_(p.float().double())  # the library loads adapters as float32 first
        expect = ours(**inputs()).last_hidden_state
    save_bottleneck_adapters(ours, tmp_path / "a", "a", reduction_factor=4)

    lib = _library_model(0, kind)
    adapters.init(lib)
    name = lib.load_adapter(str(tmp_path / "a"))
    lib.set_active_adapters(name)
    lib.double()
    with torch.no_grad():
        got = lib(**inputs()).last_hidden_state
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)
    # and the plain model differs, so the adapter mattered
    with torch.no_grad():
        plain = _library_model(0, kind).double()(**inputs()).last_hidden_state
    assert (plain - expect).abs().max() > 1e-3
