"""Gradient checkpointing (``model.gradient_checkpointing_enable()``) with every attach function:
ω and the fusion weights get the gradients of a run without checkpointing, in the reentrant
(transformers' default) and the non-reentrant mode."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from scalearn_fast import attach_fusion, attach_scalearn, detach_fusion, detach_scalearn  # noqa: E402
from scalearn_fast.models import ffn_sites  # noqa: E402

D = 32


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
            vocab_size=100, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=3,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(cfg)
    cfg = transformers.BartConfig(
        d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=40, decoder_ffn_dim=40, vocab_size=100, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, num_labels=3,
    )  # fmt: skip
    return transformers.BartForSequenceClassification(cfg)


def sources(model, n: int = 3, r: int = 4):
    g = torch.Generator().manual_seed(1)
    return {
        f"s{i}": {
            site.key: (
                torch.randn(r, D, generator=g) * 0.3,
                torch.randn(r, generator=g) * 0.3,
                torch.randn(D, r, generator=g) * 0.3,
                torch.randn(D, generator=g) * 0.3,
            )
            for site in ffn_sites(model)
        }
        for i in range(n)
    }


def batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (2, 9), generator=g)
    ids[:, -1] = 2  # BART classifies from the last </s>
    return {"input_ids": ids, "labels": torch.tensor([0, 2])}


def attach(model, method: str):
    if method == "fusion":
        return attach_fusion(model, sources(model), backend="torch", fusion_config={"dropout_prob": 0.0})
    return attach_scalearn(model, sources(model), method, backend="torch", omega_dropout=0.0)


def grads(model, checkpointing: str | None) -> dict[str, torch.Tensor]:
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "None of the inputs have requires_grad=True"
        model(**batch()).loss.backward()
    if checkpointing is not None:
        model.gradient_checkpointing_disable()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


METHODS = ["scalearn", "scalearn_uniform", "scalearn++", "scalearn_uniform++", "fusion"]


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", METHODS)
def test_checkpointing_gives_the_same_gradients(method, mode):
    model = attach(tiny("bert"), method)
    expect = grads(model, None)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(expect) == trained  # every trainable parameter has a gradient without checkpointing
    got = grads(model, mode)
    assert set(got) == set(expect)
    for name in expect:
        torch.testing.assert_close(got[name], expect[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(("omega" in n or "adapter_fusion" in n) and g.abs().sum() > 0 for n, g in got.items())


@pytest.mark.parametrize("method", ["scalearn", "fusion"])
def test_checkpointing_encoder_decoder(method):
    model = attach(tiny("bart"), method)
    expect = grads(model, None)
    got = grads(model, "reentrant")
    assert set(got) == set(expect)
    decoder = [n for n in got if ".decoder." in n and ("omega" in n or "adapter_fusion" in n)]
    assert decoder
    for name in expect:
        torch.testing.assert_close(got[name], expect[name], rtol=1e-5, atol=1e-7, msg=name)


def test_without_checkpointing_the_inputs_stay_as_they_were():
    """The hook only acts under checkpointing: without it, the embeddings' output does not
    require grad (no extra backward through the frozen embeddings), and detach removes the hook."""
    model = attach(tiny("bert"), "scalearn").train()
    seen = []
    handle = model.bert.embeddings.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    model(**batch())
    model.gradient_checkpointing_enable()
    model(**batch())
    model.gradient_checkpointing_disable()
    model.eval()
    model.gradient_checkpointing_enable()
    with torch.no_grad():
        model(**batch())
    assert seen == [False, True, False]
    detach_scalearn(model)
    handle.remove()
    # ours are gone (transformers 5 registers hooks of its own on some modules)
    from scalearn_fast.models.attach import InputsRequireGrad

    assert not any(
        isinstance(h, InputsRequireGrad) for m in model.modules() for h in m._forward_hooks.values()
    )


def test_detach_fusion_removes_the_hook_and_copies_keep_their_own():
    import copy

    model = attach(tiny("bert"), "fusion")
    clone = copy.deepcopy(model)
    detach_fusion(model)
    # ours are gone (transformers 5 registers hooks of its own on some modules)
    from scalearn_fast.models.attach import InputsRequireGrad

    assert not any(
        isinstance(h, InputsRequireGrad) for m in model.modules() for h in m._forward_hooks.values()
    )
    assert any(m._forward_hooks for m in clone.modules())  # the copy still carries its hook
    got = grads(clone, "reentrant")
    assert any("adapter_fusion" in n for n in got)
