"""accelerate / deaccelerate on models prepared with the `adapters` library: the same outputs and
gradients as the library's own Fuse and Stack(Fuse), weights shared (not copied), the library's
modules back after deaccelerate, and the compositions it cannot compute refused."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
try:
    import adapters
    from adapters import AdapterSetup
    from adapters.composition import Average, BatchSplit, Fuse, Parallel, Split, Stack
except Exception as exc:  # not installed, or not importable (e.g. transformers 5)
    pytest.skip(f"the adapters library is not importable: {exc}", allow_module_level=True)

from scalearn_fast import accelerate, accelerated, deaccelerate  # noqa: E402
from scalearn_fast.models.accelerate import is_accelerated  # noqa: E402
from scalearn_fast.models.fusion import fusion_layers  # noqa: E402

NAMES = ["a", "b", "c"]
D = 32


def _library_model(kind: str, fusion_config: str = "dynamic"):
    """A tiny model (dropout off) + three random SeqBn adapters (one of another rank) + a trained-
    looking Fuse, set up for fusion training as the library does (sources frozen)."""
    common = dict(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=100,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    if kind == "bert":
        config = transformers.BertConfig(**common)
    else:
        config = transformers.RobertaConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    adapters.init(model)
    for i, name in enumerate(NAMES):
        model.add_adapter(name, config="seq_bn" if i != 1 else "seq_bn[reduction_factor=8]")
    model.add_adapter_fusion(Fuse(*NAMES), config=fusion_config)
    model.to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name or "adapter_fusion_layer" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    model.train_adapter_fusion(Fuse(*NAMES))  # freezes all but the fusion; activates it
    return model.eval()


@pytest.fixture(scope="module", params=["bert", "roberta"])
def library(request):
    return request.param, _library_model(request.param)


def _batch():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))


def _run(model, train: bool):
    """Hidden states, logits and the fusion weights' gradients of one forward/backward."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(**_batch(), output_hidden_states=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    hidden = torch.cat([h.flatten() for h in out.hidden_states])
    return hidden.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_same_outputs_and_gradients_as_the_library(library, stacked, train):
    kind, base = library
    model = copy.deepcopy(base)
    setup = Stack(Fuse(*NAMES)) if stacked else Fuse(*NAMES)
    model.set_active_adapters(setup)
    hidden, logits, grads = _run(model, train)
    assert any("adapter_fusion_layer" in n for n in grads) and not any(".adapters." in n for n in grads)

    accelerate(model, backend="torch")
    assert len(fusion_layers(model)) == 2
    got_hidden, got_logits, got_grads = _run(model, train)
    torch.testing.assert_close(got_hidden, hidden, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_logits, logits, rtol=1e-10, atol=1e-10)
    assert got_grads.keys() == grads.keys()  # the same Parameters get gradients
    for name, g in grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-8, atol=1e-10, msg=name)

    deaccelerate(model)
    back_hidden, back_logits, _ = _run(model, train)
    assert torch.equal(back_hidden, hidden) and torch.equal(back_logits, logits)
    assert not any("adapter_fusion." in n for n, _ in model.named_parameters())


def test_weights_are_shared_not_copied(library):
    _, base = library
    model = copy.deepcopy(base)
    model.set_active_adapters(Fuse(*NAMES))
    output = model.base_model.encoder.layer[1].output
    lib_fusion = output.adapter_fusion_layer[",".join(NAMES)]
    lib_b = output.adapters["b"]
    w_down_b, w_up_b = lib_b.adapter_down[0].weight, lib_b.adapter_up.weight
    before = w_up_b.detach().clone()
    with accelerated(model, backend="torch"):
        layer = fusion_layers(model)[1]
        for proj in ("query", "key", "value"):
            assert getattr(layer, proj) is getattr(lib_fusion, proj)  # the library's own modules
        assert lib_b.adapter_down[0].weight is w_down_b  # same Parameter objects ...
        r_a = output.adapters["a"].adapter_down[0].weight.shape[0]
        item = layer.w_down.element_size()
        # ... whose storage is the packed layer's: source b starts after source a's r_a rows
        assert w_down_b.untyped_storage().data_ptr() == layer.w_down.untyped_storage().data_ptr()
        assert w_down_b.data_ptr() == layer.w_down.data_ptr() + r_a * D * item
        assert w_up_b.data_ptr() == layer.w_up.data_ptr() + r_a * item
        assert torch.equal(w_up_b, before)
        with torch.no_grad():  # an update through the library's Parameter is the layer's too
            lib_fusion.query.weight.add_(0.5)
        assert torch.equal(layer.query.weight, lib_fusion.query.weight)
    assert w_up_b.is_contiguous() and torch.equal(w_up_b, before)  # storage of its own again
    assert w_up_b.untyped_storage().data_ptr() != layer.w_up.untyped_storage().data_ptr()


def test_temperature_is_annealed_and_handed_back():
    """A fusion with temperature=True lowers τ after every call; the layer starts from the
    library's τ and hands its own back."""
    model = _library_model("bert")
    model.set_active_adapters(Fuse(*NAMES))
    for layer in model.bert.encoder.layer:
        fusion = layer.output.adapter_fusion_layer[",".join(NAMES)]
        fusion.T, fusion.reduction = 50.0, 0.05  # as BertFusion starts with temperature=True
    ref = copy.deepcopy(model)
    with accelerated(model, backend="torch"):
        for _ in range(3):
            with torch.no_grad():
                torch.testing.assert_close(model(**_batch()).logits, ref(**_batch()).logits)
    for mine, theirs in zip(model.bert.encoder.layer, ref.bert.encoder.layer, strict=True):
        t = mine.output.adapter_fusion_layer[",".join(NAMES)].T
        assert t == theirs.output.adapter_fusion_layer[",".join(NAMES)].T == pytest.approx(49.85)


def test_refusals(library):
    _, base = library
    model = copy.deepcopy(base)
    for setup, message in [
        (Parallel("a", "b"), "Parallel block"),
        (BatchSplit("a", "b", batch_sizes=[1, 2]), "BatchSplit block"),
        (Split("a", "b", splits=[4, 5]), "Split block"),
        (Average("a", "b"), "Average block"),
        (Stack("a", Fuse(*NAMES)), "Stack of 2 children"),
        (Stack("a", "b"), "Stack of 2 children"),
        ("a", "a single adapter"),
    ]:
        model.set_active_adapters(setup)
        with pytest.raises(ValueError, match=message):
            accelerate(model)
    model.set_active_adapters(None)
    with pytest.raises(ValueError, match="no active adapter setup"):
        accelerate(model)
    config = transformers.BertConfig(
        hidden_size=D, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=100
    )
    plain = transformers.BertForSequenceClassification(config)
    with pytest.raises(ValueError, match="not prepared with the adapters library"):
        accelerate(plain)

    # trainable sources: refused unless freeze_sources, whose flags deaccelerate restores
    model.set_active_adapters(Fuse(*NAMES))
    source = model.base_model.encoder.layer[0].output.adapters["a"].adapter_up.weight
    source.requires_grad_(True)
    with pytest.raises(ValueError, match="source adapter weights require grad"):
        accelerate(model)
    assert not is_accelerated(model)
    accelerate(model, freeze_sources=True)
    assert not source.requires_grad
    # a forward asking for another setup than the accelerated one is refused
    with AdapterSetup(Fuse("a", "b")), pytest.raises(ValueError, match="accelerated for Fuse"):
        model(**_batch())
    deaccelerate(model)
    assert source.requires_grad
    with pytest.raises(ValueError, match="not accelerated"):
        deaccelerate(model)
