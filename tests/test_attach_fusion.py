"""attach_fusion / detach_fusion against the `adapters` library's own Fuse setup, end to end:
adapters + fusion saved with the library, loaded here from those folders into a fresh plain model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
try:
    import adapters
    from adapters.composition import Fuse
except Exception as exc:  # not installed, or installed but not importable (e.g. transformers 5)
    pytest.skip(f"the adapters library is not importable: {exc}", allow_module_level=True)

from scalearn_fast import attach_fusion, detach_fusion  # noqa: E402
from scalearn_fast.models.fusion import fusion_layers, fusion_regularization_loss  # noqa: E402

NAMES = ["a", "b", "c"]
D = 32


def _config(kind: str):
    common = dict(
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        vocab_size=100,
        max_position_embeddings=40,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        num_labels=3,
    )
    if kind == "bert":
        return transformers.BertConfig(**common)
    if kind == "bart":  # encoder-decoder: a fusion after the FFN of every encoder and decoder layer
        return transformers.BartConfig(
            d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=100,
            max_position_embeddings=40, dropout=0.1, attention_dropout=0.1, num_labels=3,
        )  # fmt: skip
    return transformers.RobertaConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def _plain(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(_config(kind))
    return model.to(torch.float64).eval()


def _library_model(plain, fusion_config: str = "dynamic"):
    """The plain model + three random SeqBn adapters + a Fuse with random query/key/value."""
    model = copy.deepcopy(plain)
    adapters.init(model)
    for i, name in enumerate(NAMES):
        model.add_adapter(name, config="seq_bn" if i != 1 else "seq_bn[reduction_factor=8]")
    model.add_adapter_fusion(Fuse(*NAMES), config=fusion_config)
    model.set_active_adapters(Fuse(*NAMES))
    model.to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
            elif "adapter_fusion_layer" in name:
                if name.endswith("value.weight"):  # near identity, like a trained value
                    p.copy_(
                        torch.eye(D, dtype=p.dtype) + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
                    )
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model.eval()


def _save(model, tmp_path: Path, safetensors: bool = True) -> tuple[list[Path], Path]:
    folders = []
    for name in NAMES:
        folder = tmp_path / name
        model.save_adapter(str(folder), name)
        folders.append(folder)
    fusion = tmp_path / "fusion"
    model.save_adapter_fusion(str(fusion), ",".join(NAMES), use_safetensors=safetensors)
    return folders, fusion


def _inputs(seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (3, 9), generator=gen)
    ids[:, -1] = 2  # BART classifies from the last </s>; harmless for the encoders
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _logits(model, batch, hidden: bool = False):
    with torch.no_grad():
        out = model(**batch, output_hidden_states=hidden)
    return torch.cat([h.flatten() for h in out.hidden_states]) if hidden else out.logits


@pytest.mark.parametrize(
    "kind, fusion_config, safetensors",
    [("bert", "dynamic", True), ("bert", "static", False), ("roberta", "dynamic", False)],
)
def test_matches_library_and_detach_restores(tmp_path, kind, fusion_config, safetensors):
    plain = _plain(kind)
    lib = _library_model(plain, fusion_config)
    folders, fusion = _save(lib, tmp_path, safetensors)
    batch = _inputs()
    expected_logits, expected_hidden = _logits(lib, batch), _logits(lib, batch, hidden=True)

    model = copy.deepcopy(plain)
    before_logits, before_hidden = _logits(model, batch), _logits(model, batch, hidden=True)
    # sources in another order than the fusion: attach_fusion follows the checkpoint's order
    attach_fusion(model, list(reversed(folders)), fusion, backend="torch")
    assert len(fusion_layers(model)) == 2
    got_hidden = _logits(model, batch, hidden=True)
    torch.testing.assert_close(got_hidden, expected_hidden, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_logits(model, batch), expected_logits, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(expected_logits, before_logits)  # the fusion does something

    # only the fusion weights and the task head train; the sources are frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("adapter_fusion." in n or not n.startswith(kind + ".") or ".pooler." in n
                             for n in trainable)  # fmt: skip
    fusion_names = {n for n in trainable if "adapter_fusion." in n}
    per_layer = {"query.weight", "query.bias", "key.weight", "key.bias"}
    if fusion_config == "dynamic":
        per_layer.add("value.weight")
    assert {n.rsplit("adapter_fusion.", 1)[1] for n in fusion_names} == per_layer
    assert any(n.startswith("classifier.") for n in trainable)
    assert (fusion_regularization_loss(model) is not None) == (fusion_config == "dynamic")

    detach_fusion(model)
    assert torch.equal(_logits(model, batch), before_logits)
    assert torch.equal(_logits(model, batch, hidden=True), before_hidden)
    assert all(p.requires_grad for p in model.parameters())
    assert not any("adapter_fusion" in n for n, _ in model.named_parameters())


def test_bart_encoder_and_decoder_match_library(tmp_path):
    plain = _plain("bart")
    lib = _library_model(plain)
    folders, fusion = _save(lib, tmp_path)
    batch = _inputs()
    with torch.no_grad():
        expected = lib(**batch)
    model = copy.deepcopy(plain)
    attach_fusion(model, folders, fusion, backend="torch")
    assert len(fusion_layers(model)) == 4  # 2 encoder + 2 decoder layers
    with torch.no_grad():
        got = model(**batch)
    torch.testing.assert_close(got.encoder_last_hidden_state, expected.encoder_last_hidden_state,
                               rtol=1e-10, atol=1e-10)  # fmt: skip
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        before = plain(**batch).logits
    assert not torch.allclose(got.logits, before)  # the fusion does something
    detach_fusion(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_float32_and_training_step(tmp_path):
    plain = _plain("bert")
    lib = _library_model(plain)
    folders, fusion = _save(lib, tmp_path)
    batch = _inputs()
    model = copy.deepcopy(plain).float()
    attach_fusion(model, dict(zip(NAMES, folders, strict=True)), fusion)
    torch.testing.assert_close(_logits(model, batch), _logits(lib, batch).float(), rtol=1e-5, atol=1e-5)

    model.train()
    out = model(**batch, labels=torch.tensor([0, 1, 2]))
    loss = out.loss + fusion_regularization_loss(model)
    loss.backward()
    layer = fusion_layers(model)[0]
    assert layer.query.weight.grad is not None and layer.value.weight.grad.abs().sum() > 0
    assert layer.w_down.grad is None and not layer.w_down.requires_grad


def test_fresh_fusion_initialised_like_library(tmp_path):
    plain = _plain("bert")
    lib = _library_model(plain)
    folders, _ = _save(lib, tmp_path)
    model = copy.deepcopy(plain)
    attach_fusion(model, folders)  # fusion_weights=None
    for layer in fusion_layers(model):
        assert torch.equal(
            layer.value.weight, torch.full((D, D), 1e-6, dtype=torch.float64).fill_diagonal_(1.0)
        )
        assert torch.all(layer.query.bias == 0) and torch.all(layer.key.bias == 0)
        assert 0.01 < layer.query.weight.std().item() < 0.03
        assert layer.dropout == plain.config.attention_probs_dropout_prob
        assert layer.query.weight.requires_grad and layer.key.bias.requires_grad
    detach_fusion(model)
    assert torch.equal(_logits(model, _inputs()), _logits(plain, _inputs()))


def test_bad_input(tmp_path):
    plain = _plain("bert")
    lib = _library_model(plain)
    folders, fusion = _save(lib, tmp_path)

    model = copy.deepcopy(plain)
    with pytest.raises(ValueError, match=r"fuses 3 adapters .* but 2 sources"):
        attach_fusion(model, folders[:2], fusion)
    with pytest.raises(ValueError, match=r"sources are named"):
        attach_fusion(model, {"a": folders[0], "b": folders[1], "x": folders[2]}, fusion)
    assert not any(n for n, _ in model.named_parameters() if "adapter_fusion" in n)

    # a fusion checkpoint saved for a different hidden size
    meta_path = fusion / "adapter_fusion_config.json"
    meta = json.loads(meta_path.read_text())
    meta["hidden_size"] = 2 * D
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"hidden_size 64, the model has d=32"):
        attach_fusion(model, folders, fusion)

    # sources of a different d than the model
    big = _plain("bert").config
    big.hidden_size, big.num_attention_heads = 2 * D, 2
    torch.manual_seed(0)
    wide = transformers.AutoModelForSequenceClassification.from_config(big)
    with pytest.raises(ValueError, match=r"hidden size 32, the model has d=64"):
        attach_fusion(wide, folders)

    # fusion tensors of the wrong shape (state dict form)
    bad = {f"bert.encoder.layer.{i}.output.adapter_fusion_layer.a,b,c.{p}": torch.zeros(D + 1, D + 1)
           for i in range(2) for p in ("query.weight", "key.weight", "value.weight")}  # fmt: skip
    bad.update({f"bert.encoder.layer.{i}.output.adapter_fusion_layer.a,b,c.{p}": torch.zeros(D + 1)
                for i in range(2) for p in ("query.bias", "key.bias")})  # fmt: skip
    with pytest.raises(ValueError, match=r"shape \[33, 33\], the model needs \[32, 32\]"):
        attach_fusion(model, folders, bad)
    with pytest.raises(ValueError, match="fusion_weights is a int"):
        attach_fusion(model, folders, 3)
    # nothing left behind by the failed attaches
    assert torch.equal(_logits(model, _inputs()), _logits(plain, _inputs()))
    assert all(p.requires_grad for p in model.parameters())
