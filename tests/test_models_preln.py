"""Pre-LN encoder-decoders (mBART, T5, mT5, M2M100) and Marian: attach_scalearn / attach_fusion
against the `adapters` library's SeqBn adapters and Fuse, on the encoder and the decoder.

The library has no M2M100 or Marian support; their layers are built like mBART's and BART's, so
they are checked layer by layer against those models with the library, weights copied over."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
try:
    import adapters
    from adapters.composition import Fuse
except Exception as exc:  # absent, or installed against another transformers version
    pytest.skip(f"the adapters library is not importable: {exc}", allow_module_level=True)

from scalearn_fast import attach_fusion, detach_fusion  # noqa: E402
from scalearn_fast.models import (  # noqa: E402
    attach_scalearn,
    detach_scalearn,
    ffn_sites,
    is_patched,
    omega_parameters,
    scalearn_layers,
)

NAMES = ("a", "b", "c")
D = 16
BART_LIKE = dict(
    d_model=D,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=24,
    decoder_ffn_dim=24,
    vocab_size=64,
    max_position_embeddings=32,
    dropout=0.1,  # the models run in eval mode: nonzero dropout must not matter there
)
T5_LIKE = dict(d_model=D, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2, vocab_size=64)


def tiny(kind: str, seed: int = 0, activation: str | None = None):
    torch.manual_seed(seed)
    act = {} if activation is None else dict(activation_function=activation)
    if kind == "mbart":
        return transformers.MBartForConditionalGeneration(transformers.MBartConfig(**BART_LIKE, **act))
    if kind == "bart":
        return transformers.BartForConditionalGeneration(transformers.BartConfig(**BART_LIKE, **act))
    if kind == "m2m_100":
        return transformers.M2M100ForConditionalGeneration(transformers.M2M100Config(**BART_LIKE, **act))
    if kind == "marian":
        cfg = transformers.MarianConfig(**BART_LIKE, **act, decoder_vocab_size=64, pad_token_id=1)
        return transformers.MarianMTModel(cfg)
    if kind == "t5":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_LIKE))
    if kind == "mt5":
        return transformers.MT5ForConditionalGeneration(transformers.MT5Config(**T5_LIKE))
    raise AssertionError(kind)


def batch(seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding in the encoder input
    return dict(
        input_ids=ids, attention_mask=mask, decoder_input_ids=torch.randint(3, 64, (2, 5), generator=g)
    )


def outputs(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder output, decoder logits)."""
    with torch.no_grad():
        out = model(**inputs)
    return out.encoder_last_hidden_state, out.logits


def library_model(kind: str, tmp_path: Path, fusion: bool = False, **model_kw):
    """``tiny(kind)`` in fp64 with three random SeqBn adapters (and a random Fuse), saved."""
    model = tiny(kind, **model_kw)
    adapters.init(model)
    for name in NAMES:
        model.add_adapter(name, config=adapters.SeqBnConfig(reduction_factor=4))  # r = 4
    if fusion:
        model.add_adapter_fusion(Fuse(*NAMES))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".adapters." in key:
                p.normal_(0.0, 0.3)
            elif ".adapter_fusion_layer." in key:
                p.normal_(0.0, 0.3) if p.dim() == 2 else p.normal_(0.0, 0.1)
    model.double().eval()
    folders = [tmp_path / name for name in NAMES]
    for name, folder in zip(NAMES, folders, strict=True):
        model.save_adapter(str(folder), name)
    if fusion:
        model.save_adapter_fusion(str(tmp_path / "fusion"), list(NAMES))
    return model, [str(f) for f in folders]


def plain_copy(kind: str, lib, **model_kw):
    """The plain model with the library model's base weights, fp64, eval."""
    ours = tiny(kind, seed=7, **model_kw).double().eval()
    state = {k: v for k, v in lib.state_dict().items() if ".adapters." not in k and "adapter_fusion" not in k}
    missing, _ = ours.load_state_dict(state, strict=False)
    assert not [k for k in missing if "embed" not in k and "lm_head" not in k], missing
    return ours


def random_sources(model, names=NAMES, r: int = 4):
    """``{name: {site key: (w_down, b_down, w_up, b_up)}}`` with random weights."""
    g = torch.Generator().manual_seed(0)
    shapes = ((r, D), (r,), (D, r), (D,))
    return {
        name: {s.key: tuple(torch.randn(*sh, generator=g) for sh in shapes) for s in ffn_sites(model)}
        for name in names
    }


def set_one_hot(model, k: int) -> None:
    with torch.no_grad():
        for omega in omega_parameters(model):
            omega.zero_()
            omega[k] = 1.0


def assert_outputs_close(ours, ref, tol: float = 1e-9) -> None:
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- against the library, whole models ------------------------------------------------------


@pytest.mark.parametrize("kind", ["mbart", "t5", "mt5"])
def test_one_hot_scalearn_equals_library_adapter(kind, tmp_path):
    lib, folders = library_model(kind, tmp_path)
    inputs = batch()
    plain = plain_copy(kind, lib)
    before = outputs(plain, inputs)
    refs = []
    for name in NAMES:
        lib.set_active_adapters(name)
        refs.append(outputs(lib, inputs))
    ours = attach_scalearn(plain, folders, backend="torch")
    sites = ffn_sites(ours)
    assert {s.stack for s in sites} == {"encoder", "decoder"} and all(s.pre_ln for s in sites)
    assert len(scalearn_layers(ours)) == 4
    for k in range(len(NAMES)):
        set_one_hot(ours, k)
        assert_outputs_close(outputs(ours, inputs), refs[k])
    for a, b in zip(refs[0], refs[1], strict=True):  # the sources really differ, in both stacks
        assert (a - b).abs().max() > 1e-3
    assert (refs[0][0] - before[0]).abs().max() > 1e-3  # and the adapters change the encoder
    detach_scalearn(ours)
    assert not any(is_patched(s.module) for s in sites)
    assert_outputs_close(outputs(ours, inputs), before, tol=0.0)  # detach restores it exactly


@pytest.mark.parametrize("kind", ["mbart", "t5"])
def test_one_hot_fused_backend_fp32_and_training_graph(kind, tmp_path):
    """The default backend in fp32 (the inference path) and a training step (the autograd path)."""
    lib, folders = library_model(kind, tmp_path)
    inputs = batch()
    lib.float().set_active_adapters("b")
    ref = outputs(lib, inputs)
    ours = plain_copy(kind, lib).float()
    attach_scalearn(ours, folders, variant="scalearn_uniform")
    set_one_hot(ours, 1)
    assert_outputs_close(outputs(ours, inputs), ref, tol=2e-5)
    ours.train()
    loss = ours(**inputs, labels=inputs["decoder_input_ids"]).loss
    loss.backward()
    grads = [o.grad for o in omega_parameters(ours)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["mbart", "t5", "mt5"])
def test_attach_fusion_equals_library_fuse(kind, tmp_path):
    lib, folders = library_model(kind, tmp_path, fusion=True)
    inputs = batch()
    lib.set_active_adapters(Fuse(*NAMES))
    ref = outputs(lib, inputs)
    plain = plain_copy(kind, lib)
    before = outputs(plain, inputs)
    ours = attach_fusion(plain, folders, tmp_path / "fusion", backend="torch")
    assert_outputs_close(outputs(ours, inputs), ref)
    assert (ref[1] - before[1]).abs().max() > 1e-3
    detach_fusion(ours)
    assert_outputs_close(outputs(ours, inputs), before, tol=0.0)


def test_fusion_needing_h_apart_is_refused_on_layer_sites(tmp_path):
    lib, folders = library_model("mbart", tmp_path)
    ours = plain_copy("mbart", lib)
    with pytest.raises(ValueError, match="residual_before=True needs the FFN output apart"):
        attach_fusion(ours, folders, fusion_config={"residual_before": True})
    assert not any(is_patched(s.module) for s in ffn_sites(ours))


def test_t5_fusion_query_before_ln_matches_library(tmp_path):
    """T5's sites give h and x apart, so the flags that need them work there."""
    lib = tiny("t5")
    adapters.init(lib)
    for name in NAMES[:2]:
        lib.add_adapter(name, config=adapters.SeqBnConfig(reduction_factor=4))
    config = adapters.DynamicAdapterFusionConfig(query_before_ln=True, residual_before=True)
    lib.add_adapter_fusion(Fuse(*NAMES[:2]), config=config)
    with torch.no_grad():
        for key, p in lib.named_parameters():
            if ".adapters." in key or ".adapter_fusion_layer." in key:
                p.normal_(0.0, 0.2)
    lib.double().eval()
    for name in NAMES[:2]:
        lib.save_adapter(str(tmp_path / name), name)
    lib.save_adapter_fusion(str(tmp_path / "fusion"), list(NAMES[:2]))
    lib.set_active_adapters(Fuse(*NAMES[:2]))
    inputs = batch()
    ref = outputs(lib, inputs)
    ours = attach_fusion(
        plain_copy("t5", lib), [str(tmp_path / n) for n in NAMES[:2]], tmp_path / "fusion", backend="torch"
    )
    assert_outputs_close(outputs(ours, inputs), ref)


# --- M2M100 and Marian: layer by layer against mBART / BART with the library ------------------


def _call_layer(layer, hidden, **kwargs):
    """Call a transformers layer with every required argument not given set to None."""
    signature = inspect.signature(type(layer).forward)  # the class's: a patched forward takes *args
    for p in list(signature.parameters.values())[2:]:
        if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD:
            kwargs.setdefault(p.name, None)
    if "use_cache" in signature.parameters:
        kwargs.setdefault("use_cache", False)
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _layer_outputs(model, x, enc):
    stack = model.model
    return [
        _call_layer(stack.encoder.layers[0], x),
        _call_layer(stack.decoder.layers[1], x, encoder_hidden_states=enc),
    ]


@pytest.mark.parametrize(
    ("kind", "like", "style"), [("m2m_100", "mbart", "pre_ln_layer"), ("marian", "bart", "post_ln")]
)
def test_layers_equal_library_on_the_twin_model(kind, like, style, tmp_path):
    lib, folders = library_model(like, tmp_path, fusion=True, activation="relu")
    ours = tiny(kind, activation="relu").double().eval()
    layer_state = {k: v for k, v in lib.state_dict().items() if ".layers." in k and "adapter" not in k}
    missing, unexpected = ours.load_state_dict(layer_state, strict=False)
    assert not unexpected and not [k for k in missing if ".layers." in k]
    assert {s.style for s in ffn_sites(ours)} == {style}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, D, generator=g, dtype=torch.float64)
    enc = torch.randn(2, 6, D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        before = _layer_outputs(ours, x, enc)
        attach_scalearn(ours, folders, backend="torch")
        for k, name in enumerate(NAMES):
            lib.set_active_adapters(name)
            set_one_hot(ours, k)
            assert_outputs_close(_layer_outputs(ours, x, enc), _layer_outputs(lib, x, enc))
        detach_scalearn(ours)
        assert_outputs_close(_layer_outputs(ours, x, enc), before, tol=0.0)
        lib.set_active_adapters(Fuse(*NAMES))
        attach_fusion(ours, folders, tmp_path / "fusion", backend="torch")
        ref = _layer_outputs(lib, x, enc)
        assert_outputs_close(_layer_outputs(ours, x, enc), ref)
        assert (ref[0] - before[0]).abs().max() > 1e-3
        detach_fusion(ours)
        assert_outputs_close(_layer_outputs(ours, x, enc), before, tol=0.0)


# --- formats and bad input ---------------------------------------------------------------------


def test_t5_keys_parse_to_blocks_and_cross_attention_slot_is_refused():
    from scalearn_fast.formats.adapterhub import adapter_from_state_dict
    from scalearn_fast.formats.keys import site_key

    assert site_key("encoder.block.3.layer.1.adapters.a.adapter_up.bias") == ("encoder", 3)
    assert site_key("decoder.block.2.layer.2.adapters.a.adapter_up.bias") == ("decoder", 2)
    assert site_key("bert.encoder.layer.4.output.adapters.a.adapter_up.bias") == ("encoder", 4)

    def state(head):
        return {
            f"{head}.adapters.a.adapter_down.0.weight": torch.ones(2, 4),
            f"{head}.adapters.a.adapter_down.0.bias": torch.ones(2),
            f"{head}.adapters.a.adapter_up.weight": torch.ones(4, 2),
            f"{head}.adapters.a.adapter_up.bias": torch.ones(4),
        }

    src = adapter_from_state_dict({**state("encoder.block.0.layer.1"), **state("decoder.block.1.layer.2")})
    assert sorted(src.layers) == [("decoder", 1), ("encoder", 0)]
    with pytest.raises(ValueError, match="not an FFN-output adapter"):
        adapter_from_state_dict(state("decoder.block.0.layer.1"))  # cross-attention


def test_source_for_another_layout_is_refused(tmp_path):
    """An mBART adapter on a T5 with the same sizes and layer counts: the keys name another layout."""
    _, folders = library_model("mbart", tmp_path)
    t5 = tiny("t5").double()
    with pytest.raises(ValueError, match="saved for another model layout.*'output_adapters'.*'t5_block'"):
        attach_scalearn(t5, folders)
    with pytest.raises(ValueError, match="saved for another model layout"):
        attach_fusion(t5, folders)
    assert not any(is_patched(s.module) for s in ffn_sites(t5))
    attach_scalearn(tiny("m2m_100"), folders)  # the same layout as mBART: accepted


def test_unsupported_model_names_supported_and_why():
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"pre-LN \['mbart', 'm2m_100', 't5', 'mt5'\]") as err:
        ffn_sites(model)
    assert "post-LN" in str(err.value) and "'marian'" in str(err.value)


def test_pre_ln_layer_refuses_a_layer_norm():
    from scalearn_fast.layers import ScaLearnLayer
    from scalearn_fast.layers_fusion import AdapterFusionLayer

    ws = (torch.randn(1, 2, D), torch.randn(1, 2), torch.randn(1, D, 2), torch.randn(1, D))
    for cls in (ScaLearnLayer, AdapterFusionLayer):
        with pytest.raises(ValueError, match="pass layer_norm=None"):
            cls(*ws, layer_norm=torch.nn.LayerNorm(D), pre_ln=True)


@pytest.mark.parametrize("kind", ["mbart", "t5"])
def test_stage1_adapter_saves_what_the_library_computes(kind, tmp_path):
    """A stage-1 adapter at pre-LN sites, saved, loads in the library and computes the same there."""
    from scalearn_fast.train.adapter import (
        attach_bottleneck_adapters,
        detach_bottleneck_adapters,
        save_bottleneck_adapters,
    )

    model = tiny(kind).double().eval()
    inputs = batch()
    before = outputs(model, inputs)
    for adapter in attach_bottleneck_adapters(model, reduction_factor=4, seed=0):
        with torch.no_grad():
            for p in adapter.parameters():  # fp32-representable: the library loads them in fp32
                p.copy_(p.normal_(0.0, 0.3).float())
    ours = outputs(model, inputs)
    save_bottleneck_adapters(model, tmp_path / "s1", "s1", reduction_factor=4)
    detach_bottleneck_adapters(model)
    lib = tiny(kind).double().eval()
    lib.load_state_dict(model.state_dict())
    adapters.init(lib)
    lib.load_adapter(str(tmp_path / "s1"), set_active=True)
    lib.double()
    assert_outputs_close(ours, outputs(lib, inputs))
    assert (ours[0] - before[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["mbart", "t5"])
def test_greedy_generate_same_tokens_as_library(kind, tmp_path):
    lib, folders = library_model(kind, tmp_path)
    lib.float().set_active_adapters("c")
    ours = attach_scalearn(plain_copy(kind, lib).float(), folders)
    set_one_hot(ours, 2)
    ids = batch()["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=1, decoder_start_token_id=2, min_new_tokens=6)
    with torch.no_grad():
        ref = lib.generate(ids, **kw)
        out = ours.generate(ids, **kw)
        plain = detach_scalearn(ours).generate(ids, **kw)
    assert torch.equal(out, ref)
    assert not torch.equal(plain, ref)  # the adapter changes the tokens


@pytest.mark.parametrize("kind", ["mbart", "t5"])
def test_gradient_checkpointing_trains_omega(kind):
    model = tiny(kind)
    sources = random_sources(model)
    attach_scalearn(model, sources)
    model.gradient_checkpointing_enable()
    model.train()
    inputs = batch()
    model(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
    grads = [o.grad for o in omega_parameters(model)]
    assert len(grads) == 4 and all(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_bart_fusion_needing_h_apart_is_refused():
    """BART's site sees only h + x too: query_before_ln would have used h + x as the query."""
    model = tiny("bart")
    sources = random_sources(model, NAMES[:2])
    with pytest.raises(ValueError, match="query_before_ln=True needs the FFN output apart"):
        attach_fusion(model, sources, fusion_config={"query_before_ln": True})
    assert not any(is_patched(s.module) for s in ffn_sites(model))


# --- decoding: generate() with cached key/values -----------------------------------------------

GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1, decoder_start_token_id=2)


@pytest.mark.parametrize("kind", ["mbart", "t5", "marian"])
@pytest.mark.parametrize("method", ["scalearn", "fusion"])
def test_generate_with_cache_equals_without(kind, method):
    """Each cached decoder step runs the sub-layers at T = batch; the tokens must be those of the
    uncached run (the whole prefix recomputed every step), and differ from the plain model's."""
    model = tiny(kind).eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        plain = model.generate(ids, **GREEDY)
    sources = random_sources(model)
    (attach_scalearn if method == "scalearn" else attach_fusion)(model, sources)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **GREEDY)
        uncached = model.generate(ids, use_cache=False, **GREEDY)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)


@pytest.mark.parametrize("kind", ["mbart", "t5"])
def test_greedy_generate_with_fusion_same_tokens_as_library(kind, tmp_path):
    """Same tokens, and step scores that match the library's and differ from the plain model's
    (the tiny models' greedy tokens alone may not move)."""
    lib, folders = library_model(kind, tmp_path, fusion=True)
    lib.float().set_active_adapters(Fuse(*NAMES))
    ours = attach_fusion(plain_copy(kind, lib).float(), folders, tmp_path / "fusion")
    ids = batch()["input_ids"]
    kw = dict(GREEDY, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = lib.generate(ids, **kw)
        out = ours.generate(ids, **kw)
        plain = detach_fusion(ours).generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-4)
    steps = min(len(plain.scores), len(ref.scores))
    a, b = torch.stack(plain.scores[:steps]), torch.stack(ref.scores[:steps])
    finite = torch.isfinite(a) & torch.isfinite(b)  # logits processors set some scores to -inf
    assert (a - b)[finite].abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["mbart", "marian"])
def test_summed_sites_with_a_hook_give_the_same_output(kind):
    """Sites that see only h + x call the sub-layer's forward_summed directly; with a forward hook
    on it they go through ``sublayer(h + x, zeros)`` instead, and the hook sees the call."""
    model = tiny(kind).eval()
    attach_scalearn(model, random_sources(model))
    inputs = batch()
    direct = outputs(model, inputs)
    seen = []
    layer = scalearn_layers(model)[0]
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append(len(args)))
    hooked = outputs(model, inputs)
    handle.remove()
    assert seen and all(n == 2 for n in seen)
    assert_outputs_close(hooked, direct, tol=0.0)


def test_fusion_forward_summed_refuses_what_needs_h_apart():
    from scalearn_fast.layers_fusion import AdapterFusionLayer

    ws = (torch.randn(2, 3, D), torch.randn(2, 3), torch.randn(2, D, 3), torch.randn(2, D))
    layer = AdapterFusionLayer(*ws, residual_before=True, pre_ln=True)
    with pytest.raises(ValueError, match="need the FFN output h apart"):
        layer.forward_summed(torch.randn(2, D))
