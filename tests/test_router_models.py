"""attach_router / detach_router / save_router / load_router on transformers models, against the
`adapters` library (one adapter active; ``average_adapter(..., combine_strategy="linear")``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from scalearn_fast.models import (  # noqa: E402
    attach_router,
    detach_router,
    ffn_sites,
    is_patched,
    load_router,
    router_layers,
    router_parameters,
    save_router,
)

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    vocab_size=100,
    max_position_embeddings=64,
)
NAMES = ("a", "b", "c")


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(**TINY)).eval()
    if kind == "roberta":
        return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**TINY)).eval()
    if kind == "bart":
        cfg = transformers.BartConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            vocab_size=100,
            max_position_embeddings=64,
        )
        return transformers.BartForSequenceClassification(cfg).eval()
    raise AssertionError(kind)


def random_sources(model, ranks=(4, 4, 4), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    return {
        f"s{i}": {
            site.key: (
                torch.randn(r, d, generator=g) * 0.3,
                torch.randn(r, generator=g) * 0.3,
                torch.randn(d, r, generator=g) * 0.3,
                torch.randn(d, generator=g) * 0.3,
            )
            for site in ffn_sites(model)
        }
        for i, r in enumerate(ranks)
    }


def ids_for(model, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 9), generator=g)
    if model.config.model_type == "bart":
        ids[:, -1] = model.config.eos_token_id
    return ids


def set_gates(model, weights) -> None:
    """Routers that ignore z: zero weight, bias log(w) (softmax gives w; top-1 picks argmax)."""
    with torch.no_grad():
        for layer in router_layers(model):
            layer.router.weight.zero_()
            layer.router.bias.copy_(torch.tensor([math.log(w) if w > 0 else -30.0 for w in weights]))


def _library_model(kind: str, tmp_path: Path):
    try:
        import adapters
    except ImportError as err:
        pytest.skip(f"the optional `adapters` library is not importable here: {err}")
    model = tiny(kind)
    adapters.init(model)
    for name in NAMES:
        model.add_adapter(name, config=adapters.SeqBnConfig(reduction_factor=8))  # r = 4
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".adapters." in key:
                p.normal_(0.0, 0.3)
    model.eval()
    folders = []
    for name in NAMES:
        model.save_adapter(str(tmp_path / name), name)
        folders.append(str(tmp_path / name))
    return model, folders


def _ours_like(lib, kind: str):
    ours = tiny(kind)
    missing, _ = ours.load_state_dict(
        {k: v for k, v in lib.state_dict().items() if ".adapters." not in k}, strict=False
    )
    assert not missing
    return ours


@pytest.mark.parametrize("kind", ["bert", "bart"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_output_one_hot_equals_adapters_library(kind, granularity, tmp_path):
    lib, folders = _library_model(kind, tmp_path)
    ids = ids_for(lib)
    ours = _ours_like(lib, kind)
    attach_router(ours, folders, gate="topk", k=1, granularity=granularity, mode="output")
    for k, name in enumerate(NAMES):
        lib.set_active_adapters(name)
        with torch.no_grad():
            ref = lib(ids).logits
        set_gates(ours, [1.0 if i == k else 0.5 for i in range(3)])
        with torch.no_grad():
            out = ours(ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "roberta", "bart"])
def test_merge_constant_gates_equal_average_adapter(kind, tmp_path):
    lib, folders = _library_model(kind, tmp_path)
    ids = ids_for(lib)
    weights = [0.5, 0.3, 0.2]
    lib.average_adapter("avg", list(NAMES), weights=weights, combine_strategy="linear")
    lib.set_active_adapters("avg")
    with torch.no_grad():
        ref = lib(ids).logits
    ours = _ours_like(lib, kind)
    attach_router(ours, folders, gate="softmax", granularity="sequence", mode="merge")
    set_gates(ours, weights)
    with torch.no_grad():
        out = ours(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the output mode is a different composition (non-linear in the parameters)
    detach_router(ours)
    attach_router(ours, folders, gate="softmax", mode="output")
    set_gates(ours, weights)
    with torch.no_grad():
        assert (ours(ids).logits - ref).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["output", "merge"])
@pytest.mark.parametrize("positional", [False, True])
def test_sequence_router_ignores_padding(mode, positional):
    model = tiny("bert")
    attach_router(model, random_sources(model), granularity="sequence", mode=mode)
    with torch.no_grad():
        for layer in router_layers(model):
            layer.router.weight.normal_(0.0, 1.0)
    ids = ids_for(model)
    short = ids[:1, :5]
    padded = ids.clone()
    padded[0, 5:] = 0
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        alone = model(short).logits
        batch = model(padded, mask).logits if positional else model(padded, attention_mask=mask).logits
        unmasked = model(padded).logits
    torch.testing.assert_close(batch[:1], alone, rtol=1e-5, atol=1e-6)
    assert (unmasked[:1] - alone).abs().max() > 1e-4  # without the mask the padding changes the gates


def test_training_step_detach_and_frozen_base():
    model = tiny("bert").train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    attach_router(model, random_sources(model), gate="topk", k=2, granularity="token")
    params = router_parameters(model)
    assert len(params) == 2 * len(ffn_sites(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".router." in n or n.startswith("classifier") or ".pooler." in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(ids_for(model), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt.step()
    detach_router(model)
    assert not any(is_patched(s.module) for s in ffn_sites(model))
    assert not model._forward_pre_hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    for n, p in model.named_parameters():
        if not n.startswith("classifier") and ".pooler." not in n:
            torch.testing.assert_close(p, base[n])


def test_sequence_router_under_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        model = tiny("bert").train()
        model.config.hidden_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        attach_router(model, random_sources(model), granularity="sequence", mode="merge")
        if checkpointing:
            model.gradient_checkpointing_enable()
        with torch.no_grad():
            torch.manual_seed(3)
            for layer in router_layers(model):
                layer.router.weight.normal_()
        ids = ids_for(model)
        mask = torch.ones_like(ids)
        mask[0, 4:] = 0
        model(ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.backward()
        grads.append([p.grad.clone() for p in router_parameters(model)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("include_sources", [False, True])
def test_save_load_roundtrip(include_sources, tmp_path):
    lib, folders = _library_model("bert", tmp_path)
    model = _ours_like(lib, "bert")
    attach_router(model, folders, gate="topk", k=2, granularity="sequence", mode="merge")
    with torch.no_grad():
        for layer in router_layers(model):
            layer.router.weight.normal_()
            layer.router.bias.normal_()
        model.classifier.weight.normal_()
    ids = ids_for(model)
    with torch.no_grad():
        want = model(ids).logits
    save_router(model, tmp_path / "ckpt", include_sources=include_sources)
    fresh = _ours_like(lib, "bert")
    if include_sources:  # the source folders are not needed
        for f in folders:
            for p in Path(f).iterdir():
                p.unlink()
    load_router(fresh, tmp_path / "ckpt")
    layer = router_layers(fresh)[0]
    assert (layer.gate, layer.k, layer.granularity, layer.mode) == ("topk", 2, "sequence", "merge")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, want)


def test_load_errors_leave_model_unpatched(tmp_path):
    model = tiny("bert")
    srcs = random_sources(model)
    attach_router(model, srcs)
    save_router(model, tmp_path / "ckpt", include_sources=True)
    other = tiny("bert")
    with pytest.raises(
        ValueError, match=r"source names \['s0', 's1', 's2'\] .* do not match the given \['s0', 's1'\]"
    ):
        load_router(other, tmp_path / "ckpt", sources={k: srcs[k] for k in ("s0", "s1")})
    assert not any(is_patched(s.module) for s in ffn_sites(other))
    with pytest.raises(ValueError, match="no router_config.json"):
        load_router(other, tmp_path)


def test_attach_errors():
    model = tiny("bert")
    with pytest.raises(ValueError, match=r"k=4 must be between 1 and the number of sources N=3"):
        attach_router(model, random_sources(model), gate="topk", k=4)
    with pytest.raises(ValueError, match=r"merge mode needs sources of equal rank; at .* \{'s0': 4, 's1': 2"):
        attach_router(model, random_sources(model, ranks=(4, 2, 4)), mode="merge")
    assert not any(is_patched(s.module) for s in ffn_sites(model))
    attach_router(model, random_sources(model, ranks=(4, 2, 4)), mode="output")  # fine in output mode
    with pytest.raises(RuntimeError, match="router is already attached"):
        attach_router(model, random_sources(model))
    detach_router(model)
    with pytest.raises(ValueError, match="has no router attached"):
        detach_router(model)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_model_routes_with_its_own_mask(how):
    import copy
    import io
    import pickle

    model = tiny("bert")
    attach_router(model, random_sources(model), granularity="sequence")
    with torch.no_grad():
        for layer in router_layers(model):
            layer.router.weight.normal_(0.0, 1.0)
    if how == "deepcopy":
        other = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        pickle.dump(model, buf)
        other = pickle.loads(buf.getvalue())
    hook = next(iter(other._forward_pre_hooks.values()))
    assert all(layer.context is hook.context for layer in router_layers(other))
    assert hook.context is not router_layers(model)[0].context
    ids = ids_for(model)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            other(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )
        torch.testing.assert_close(other(ids[:1, :5]).logits, model(ids, attention_mask=mask).logits[:1])
    detach_router(other)
    assert not other._forward_pre_hooks and model._forward_pre_hooks
