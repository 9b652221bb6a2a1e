"""The file formats on their own: fusion folders and adapter folders that are broken or unsafe
give errors naming the file; pickled .bin files load only with trust_pickle=True; the activation
names map onto the one table in ops/activations."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

from scalearn_fast.formats import (
    ADAPTER_CONFIG,
    FUSION_CONFIGS,
    LIBRARY_ACTIVATIONS,
    adapter_from_state_dict,
    check_adapter_config,
    load_adapterhub_source,
    load_adapterhub_sources,
    load_fusion_checkpoint,
    split_fusion_state_dict,
)
from scalearn_fast.formats.fusion import CONFIG_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME
from scalearn_fast.ops.activations import ACTIVATIONS

D = 8


def fusion_state(prefix: str = "bert.encoder.layer", layers: int = 2, name: str = "a,b,c"):
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        base = f"{prefix}.{i}.output.adapter_fusion_layer.{name}"
        for p in ("query", "key", "value"):
            state[f"{base}.{p}.weight"] = torch.randn(D, D, generator=g)
        for p in ("query", "key"):
            state[f"{base}.{p}.bias"] = torch.randn(D, generator=g)
    return state


def fusion_folder(root: Path, safetensors: bool = True, state=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    meta = {"name": "a,b,c", "adapter_names": ["a", "b", "c"], "config": FUSION_CONFIGS["dynamic"],
            "hidden_size": D}  # fmt: skip
    (root / CONFIG_NAME).write_text(json.dumps(meta))
    state = fusion_state() if state is None else state
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(root / SAFE_WEIGHTS_NAME))
    else:
        torch.save(state, root / WEIGHTS_NAME)
    return root


@pytest.mark.parametrize("safetensors", [True, False])
def test_fusion_folder_reads(tmp_path, safetensors):
    ckpt = load_fusion_checkpoint(fusion_folder(tmp_path, safetensors))
    assert ckpt.name == "a,b,c" and ckpt.adapter_names == ["a", "b", "c"] and ckpt.hidden_size == D
    assert sorted(ckpt.sites) == [("encoder", 0), ("encoder", 1)] and sorted(ckpt.layers) == [0, 1]
    key = "bert.encoder.layer.1.output.adapter_fusion_layer.a,b,c.value.weight"
    assert torch.equal(ckpt.layers[1]["value.weight"], fusion_state()[key])


def test_encoder_and_decoder_fusion_keys_split_by_stack():
    state = {**fusion_state("model.encoder.layers"), **fusion_state("model.decoder.layers")}
    state = {
        k.replace(".output.adapter_fusion", ".output_adapters.adapter_fusion"): v for k, v in state.items()
    }
    sites = split_fusion_state_dict(state)["a,b,c"]
    assert sorted(sites) == [("decoder", 0), ("decoder", 1), ("encoder", 0), ("encoder", 1)]
    assert sorted(sites[("decoder", 1)]) == [
        "key.bias",
        "key.weight",
        "query.bias",
        "query.weight",
        "value.weight",
    ]


def test_fusion_config_that_is_truncated_names_the_file(tmp_path):
    folder = fusion_folder(tmp_path)
    (folder / CONFIG_NAME).write_text('{"name": "a,b,c", ')
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: corrupt JSON"):
        load_fusion_checkpoint(folder)
    (folder / CONFIG_NAME).write_text("null")
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: expected a JSON object, got NoneType"):
        load_fusion_checkpoint(folder)
    (folder / CONFIG_NAME).write_text(json.dumps({"name": "a,b,c", "adapter_names": 3}))
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: 'adapter_names' is 3"):
        load_fusion_checkpoint(folder)


def test_empty_fusion_bin_names_the_file(tmp_path):
    folder = fusion_folder(tmp_path, safetensors=False)
    (folder / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: cannot read weights"):
        load_fusion_checkpoint(folder)


def test_truncated_fusion_safetensors_names_the_file(tmp_path):
    folder = fusion_folder(tmp_path)
    data = (folder / SAFE_WEIGHTS_NAME).read_bytes()
    (folder / SAFE_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{SAFE_WEIGHTS_NAME}: cannot read weights"):
        load_fusion_checkpoint(folder)


def test_pickled_fusion_bin_needs_trust_pickle(tmp_path):
    """A legacy .bin whose dict is a pickled Python class: refused with a message that says how
    to load a trusted file, and loaded with trust_pickle=True."""
    folder = fusion_folder(tmp_path, safetensors=False, state=collections.UserDict(fusion_state()))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: holds pickled Python objects.*trust_pickle=True"):
        load_fusion_checkpoint(folder)
    ckpt = load_fusion_checkpoint(folder, trust_pickle=True)
    assert sorted(ckpt.layers) == [0, 1]


def test_pickled_fusion_bin_through_attach_fusion(tmp_path):
    transformers = pytest.importorskip("transformers")
    from scalearn_fast import attach_fusion
    from scalearn_fast.models import ffn_sites
    from scalearn_fast.models.fusion import fusion_layers

    torch.manual_seed(0)
    model = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
            vocab_size=50,
            max_position_embeddings=16,
        )  # fmt: skip
    )
    g = torch.Generator().manual_seed(1)
    sources = {
        n: {
            s.key: (
                torch.randn(2, D, generator=g),
                torch.randn(2, generator=g),
                torch.randn(D, 2, generator=g),
                torch.randn(D, generator=g),
            )
            for s in ffn_sites(model)
        }  # fmt: skip
        for n in "abc"
    }
    folder = fusion_folder(tmp_path, safetensors=False, state=collections.UserDict(fusion_state()))
    with pytest.raises(ValueError, match="trust_pickle=True"):
        attach_fusion(model, sources, folder, backend="torch")
    attach_fusion(model, sources, folder, backend="torch", trust_pickle=True)
    key = "bert.encoder.layer.1.output.adapter_fusion_layer.a,b,c.query.weight"
    assert torch.equal(fusion_layers(model)[1].query.weight, fusion_state()[key])


def adapter_state(name: str = "a"):
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(2):
        base = f"bert.encoder.layer.{i}.output.adapters.{name}"
        out[f"{base}.adapter_down.0.weight"] = torch.randn(2, D, generator=g)
        out[f"{base}.adapter_down.0.bias"] = torch.randn(2, generator=g)
        out[f"{base}.adapter_up.weight"] = torch.randn(D, 2, generator=g)
        out[f"{base}.adapter_up.bias"] = torch.randn(D, generator=g)
    return out


def test_adapter_folder_errors_name_the_file(tmp_path):
    (tmp_path / ADAPTER_CONFIG).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{ADAPTER_CONFIG}: expected a JSON object, got list"):
        load_adapterhub_source(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"name": 3, "config": {}}))
    torch.save(adapter_state(), tmp_path / "pytorch_adapter.bin")
    with pytest.raises(ValueError, match=rf"{ADAPTER_CONFIG}: 'name' is 3"):
        load_adapterhub_source(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"name": "a", "config": {}}))
    torch.save(collections.UserDict(adapter_state()), tmp_path / "pytorch_adapter.bin")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_adapterhub_source(tmp_path)
    assert load_adapterhub_sources([tmp_path], trust_pickle=True)[0].name == "a"


def test_adapter_state_with_a_wrong_shape_names_the_tensor():
    state = adapter_state()
    state["bert.encoder.layer.1.output.adapters.a.adapter_up.weight"] = torch.zeros(D, 3)
    with pytest.raises(ValueError, match=r"w_up has shape \[8, 3\], expected \[8, 2\]"):
        adapter_from_state_dict(state)


def test_sources_of_the_wrong_kind():
    with pytest.raises(ValueError, match="sources is a int"):
        load_adapterhub_sources(3)
    with pytest.raises(ValueError, match="sources is empty"):
        load_adapterhub_sources([])


def test_library_activation_names_map_onto_the_one_table():
    assert set(LIBRARY_ACTIVATIONS.values()) <= set(ACTIVATIONS)
    assert check_adapter_config({"non_linearity": "swish"}) == "silu"
    assert check_adapter_config({"non_linearity": "linear"}) == "identity"
    assert check_adapter_config({"non_linearity": "GELU"}) == "gelu"
    with pytest.raises(ValueError, match="non_linearity 'gelu_new'"):  # tanh-approximate GELU: not ours
        check_adapter_config({"non_linearity": "gelu_new"})
