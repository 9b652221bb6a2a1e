"""A mixture over PEFT LoRA folders against PEFT itself (code nobody here wrote): constant gates of
1 = PEFT with the same LoRAs active together (their sum), one-hot gates = PEFT with that one LoRA;
and the configs a mixture cannot compute exactly are refused, naming the field."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
from transformers import BertConfig, BertModel  # noqa: E402

from scalearn_fast.models.lora_mixture import (  # noqa: E402
    attach_lora_mixture,
    detach_lora_mixture,
    lora_mixture_layers,
    lora_mixture_parameters,
    set_lora_mixture_gates,
)

CONFIG = BertConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64
)
# different ranks, alphas and scaling rules: padding to the largest rank and per-expert scaling
LORAS = {
    "p1": {"r": 4, "lora_alpha": 8},
    "p2": {"r": 2, "lora_alpha": 3},
    "p3": {"r": 4, "lora_alpha": 4, "use_rslora": True},
}


def _base() -> BertModel:
    torch.manual_seed(0)
    return BertModel(CONFIG).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three LoRAs on query/value made and saved by PEFT, with random non-zero B; and the PEFT
    model holding all three."""
    root = tmp_path_factory.mktemp("peft_loras")
    model = None
    for i, (name, opts) in enumerate(LORAS.items()):
        config = peft.LoraConfig(target_modules=["query", "value"], lora_dropout=0.1, **opts)
        if model is None:
            model = peft.get_peft_model(_base(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"lora_B.{name}." in pname or f"lora_A.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        model.save_pretrained(str(root), selected_adapters=[name])
    paths = {name: root / name for name in LORAS}
    for name in LORAS:  # save_pretrained puts non-default adapters in a sub-folder of that name
        if not (paths[name] / "adapter_config.json").exists():
            paths[name] = root
    assert len({str(p) for p in paths.values()}) == len(LORAS), paths
    return paths, model.eval()


def _ids():
    return torch.randint(0, CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))


def _mixture(folders, **kw):
    paths, _ = folders
    return attach_lora_mixture(_base(), sources=[str(p) for p in paths.values()], **kw)


def test_constant_gates_equal_peft_with_all_loras_active(folders):
    _, peft_model = folders
    peft_model.base_model.set_adapter(list(LORAS))
    with torch.no_grad():
        want = peft_model(input_ids=_ids()).last_hidden_state
    model = _mixture(folders).eval()
    set_lora_mixture_gates(model, [1.0, 1.0, 1.0])
    with torch.no_grad():
        got = model(input_ids=_ids()).last_hidden_state
        plain = _base()(input_ids=_ids()).last_hidden_state
    assert (want - plain).abs().max() > 1e-2  # the LoRAs change the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", range(len(LORAS)))
def test_one_hot_gates_equal_peft_with_that_lora(folders, which):
    _, peft_model = folders
    name = list(LORAS)[which]
    peft_model.base_model.set_adapter(name)
    with torch.no_grad():
        want = peft_model(input_ids=_ids()).last_hidden_state
    model = _mixture(folders).eval()
    set_lora_mixture_gates(model, torch.nn.functional.one_hot(torch.tensor(which), 3).float())
    with torch.no_grad():
        got = model(input_ids=_ids()).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sources_train_only_the_router(folders):
    model = _mixture(folders, top_k=2, dropconnect=0.0).train()
    params = lora_mixture_parameters(model)
    assert params == [layer.router.weight for layer in lora_mixture_layers(model)]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if n.endswith("lora_mixture.router.weight")
    }
    model(input_ids=_ids()).last_hidden_state.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    detach_lora_mixture(model)
    torch.testing.assert_close(
        model.eval()(input_ids=_ids()).last_hidden_state, _base()(input_ids=_ids()).last_hidden_state
    )


def _edited(folders, tmp_path, **changes):
    paths, _ = folders
    src = paths["p1"]
    dst = tmp_path / "edited"
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return dst


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"alpha_pattern": {"query": 4}}, "alpha_pattern"),
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"target_modules": ["query"]}, "target_modules"),
        ({"peft_type": "IA3"}, "peft_type"),
    ],
)
def test_refuses_what_it_cannot_compute_exactly(folders, tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        attach_lora_mixture(_base(), sources=[str(_edited(folders, tmp_path, **changes))])


def test_source_argument_errors(folders, tmp_path):
    paths, _ = folders
    with pytest.raises(ValueError, match="num_experts=2 but 3 sources"):
        _mixture(folders, num_experts=2)
    with pytest.raises(ValueError, match="rank and alpha come from"):
        _mixture(folders, rank=4)
    with pytest.raises(ValueError, match="top_k"):
        _mixture(folders, top_k=4)
    with pytest.raises(ValueError, match="does not exist"):
        attach_lora_mixture(_base(), sources=[str(tmp_path / "missing")])
    ok = str(_edited(folders, tmp_path))  # lora_dropout (0.1 here) is fine: eval-only
    attach_lora_mixture(_base(), sources=[ok], top_k=1)
