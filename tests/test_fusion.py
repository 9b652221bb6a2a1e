"""AdapterFusion: the fused op and layer against the float64 loop and the `adapters` library's own
``BertFusion`` (same weights), gradients, score dropout in training, shapes and bad input."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from scalearn_fast.ops.fusion import adapter_fusion

F64 = torch.float64


def make_case(n=3, r=4, d=16, lead=(2, 5), dtype=F64, seed=0, ranks=None):
    """Random sources and fusion weights, large enough that the softmax is far from uniform."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.3):
        return (torch.randn(*shape, generator=g, dtype=F64) * std).to(dtype)

    if ranks is None:
        src = [rnd(n, r, d), rnd(n, r, std=0.1), rnd(n, d, r), rnd(n, d, std=0.1)]
    else:
        src = [[rnd(k, d) for k in ranks], [rnd(k, std=0.1) for k in ranks]]
        src += [[rnd(d, k) for k in ranks], [rnd(d, std=0.1) for k in ranks]]
    eye = torch.eye(d, dtype=F64).to(dtype)
    fusion = [rnd(d, d), rnd(d), rnd(d, d), rnd(d), eye + rnd(d, d, std=0.1)]
    z = rnd(*lead, d, std=1.0)
    h = rnd(*lead, d, std=1.0)
    return src, fusion, z, h


def adapter_outputs(src, z):
    wd, bd, wu, bu = src
    return torch.stack([torch.relu(z @ wd[i].T + bd[i]) @ wu[i].T + bu[i] for i in range(len(wd))])


def library_fusion(config_name, d, fusion, dropout=0.1, **overrides):
    pytest.importorskip("adapters", reason="compares with the optional `adapters` library")
    from adapters.configuration import AdapterFusionConfig
    from adapters.methods.modeling import BertFusion

    config = AdapterFusionConfig.load(config_name, **overrides)
    layer = BertFusion(config, d, dropout).to(fusion[0].dtype)
    with torch.no_grad():
        layer.query.weight.copy_(fusion[0])
        layer.query.bias.copy_(fusion[1])
        layer.key.weight.copy_(fusion[2])
        layer.key.bias.copy_(fusion[3])
        if hasattr(layer, "value"):
            layer.value.weight.copy_(fusion[4])
    return layer


def run_library(layer, src, z, h):
    """Feed the library layer as ``compose_fuse`` does: the adapters' ``up`` stacked to [B, S, N, d]."""
    ups = adapter_outputs(src, z).permute(1, 2, 0, 3)
    return layer(z, ups.clone(), ups.clone(), h)  # the library adds in place under residual_before


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("config", ["dynamic", "static"])
def test_matches_adapters_library_eval(backend, config):
    src, fusion, z, h = make_case()
    lib = library_fusion(config, 16, fusion).eval()
    value = fusion[4] if config == "dynamic" else None
    out = adapter_fusion(z, *src, *fusion[:4], value, h, backend=backend)
    torch.testing.assert_close(out, run_library(lib, src, z, h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_matches_adapters_library_residual_before_and_temperature(backend):
    src, fusion, z, h = make_case(seed=1)
    lib = library_fusion("dynamic", 16, fusion, residual_before=True, temperature=True).eval()
    assert lib.T == 50.0
    out = adapter_fusion(z, *src, *fusion, h, residual_before=True, temperature=50.0, backend=backend)
    torch.testing.assert_close(out, run_library(lib, src, z, h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_score_dropout_matches_adapters_library_in_training(backend):
    """Same RNG state -> the library and every backend drop the same scores; output equal."""
    src, fusion, z, h = make_case(lead=(4, 6), seed=2)
    lib = library_fusion("dynamic", 16, fusion, dropout=0.4).train()
    torch.manual_seed(11)
    expect = run_library(lib, src, z, h)
    torch.manual_seed(11)
    out = adapter_fusion(z, *src, *fusion, h, dropout_p=0.4, training=True, backend=backend)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    torch.manual_seed(11)  # the key-bias shift matters under dropout: dropping it would differ
    no_bias = adapter_fusion(z, *src, fusion[0], fusion[1], fusion[2], None, fusion[4], h, dropout_p=0.4,
                             training=True, backend=backend)  # fmt: skip
    assert (no_bias - expect).abs().max() > 1e-6


def test_dropout_changes_output_only_in_training():
    src, fusion, z, h = make_case()
    eval_out = adapter_fusion(z, *src, *fusion, h, dropout_p=0.5, training=False, backend="torch")
    train_out = adapter_fusion(z, *src, *fusion, h, dropout_p=0.5, training=True, backend="torch")
    torch.testing.assert_close(eval_out, adapter_fusion(z, *src, *fusion, h, backend="torch"))
    assert (train_out - eval_out).abs().max() > 1e-6


def _rule(out, out_ref_same_dtype, ref64, atol):
    if out.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    base = (out_ref_same_dtype.double() - ref64).abs().max().item()
    assert err <= 3 * base + atol, (err, base)


@pytest.mark.parametrize(
    "shape",
    [
        dict(lead=(2, 7), n=3, r=4, d=16),
        dict(lead=(0,), n=2, r=4, d=16),  # T = 0
        dict(lead=(1,), n=1, r=3, d=13),  # T = 1, N = 1, d not a multiple of 16
        dict(lead=(7,), n=3, r=5, d=24),
        dict(lead=(3, 2), d=12, ranks=(2, 5, 3)),  # heterogeneous r
    ],
)
def test_torch_float32_against_float64_reference(shape):
    src, fusion, z, h = make_case(dtype=torch.float32, **shape)
    src64 = [[t.double() for t in s] if isinstance(s, list) else s.double() for s in src]
    fusion64 = [t.double() for t in fusion]
    ref64 = adapter_fusion(z.double(), *src64, *fusion64, h.double(), backend="reference")
    ref32 = adapter_fusion(z, *src, *fusion, h, backend="reference")
    out = adapter_fusion(z, *src, *fusion, h, backend="torch")
    assert out.shape == z.shape and out.dtype == torch.float32
    _rule(out, ref32, ref64, atol=1e-5)


def test_non_contiguous_inputs_and_query_input():
    src, fusion, z, h = make_case(lead=(5, 3))
    zt, ht = z.transpose(0, 1), h.transpose(0, 1)
    qw = fusion[0].T.contiguous().T
    c = torch.randn_like(zt)
    args = (zt, *src, qw, *fusion[1:], ht)
    ref = adapter_fusion(*args, query_input=c, backend="reference")
    out = adapter_fusion(*args, query_input=c, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def _grads(backend, src, fusion, z, h, seed=None, **kw):
    leaves = [t.clone().requires_grad_() for t in (z, h, *fusion)]
    if seed is not None:
        torch.manual_seed(seed)
    out = adapter_fusion(leaves[0], *src, *leaves[2:], leaves[1], backend=backend, **kw)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    return torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True)


@pytest.mark.parametrize(
    "kw",
    [{}, dict(dropout_p=0.3, training=True), dict(residual_before=True, temperature=2.5)],
    ids=["eval", "dropout", "residual_before"],
)
def test_torch_grads_match_reference(kw):
    src, fusion, z, h = make_case(lead=(3, 4), seed=3)
    names = ["z", "residual", "query_weight", "query_bias", "key_weight", "key_bias", "value_weight"]
    ref = _grads("reference", src, fusion, z, h, seed=7, **kw)
    got = _grads("torch", src, fusion, z, h, seed=7, **kw)
    for name, a, b in zip(names, got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_key_bias_gradient_is_exactly_zero_without_dropout():
    src, fusion, z, h = make_case()
    grads = _grads("torch", src, fusion, z, h)
    assert grads[5] is not None and torch.count_nonzero(grads[5]) == 0
    grads = _grads("torch", src, fusion, z, h, seed=0, dropout_p=0.3, training=True)
    assert grads[5].abs().max() > 0


@pytest.mark.parametrize("kw", [{}, dict(dropout_p=0.3, training=True)], ids=["eval", "dropout"])
def test_gradcheck_torch_backend(kw):
    src, fusion, z, h = make_case(n=2, r=3, d=5, lead=(3,), seed=4)
    src[0] = src[0].clone().requires_grad_()  # a source weight too: they may train
    inputs = [t.clone().requires_grad_() for t in (z, h, *fusion)]

    def fn(z_, h_, qw, qb, kw_, kb, vw, wd):
        torch.manual_seed(5)  # the same dropout mask on every evaluation
        return adapter_fusion(z_, wd, *src[1:], qw, qb, kw_, kb, vw, h_, backend="torch", **kw)

    assert torch.autograd.gradcheck(fn, (*inputs, src[0]))


def _has_triton_backend() -> bool:
    return importlib.util.find_spec("triton") is not None and (
        importlib.util.find_spec("scalearn_fast.ops.triton_backend") is not None
    )


@pytest.mark.skipif(not _has_triton_backend(), reason="the core op's triton backend is not in this tree")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead, n, r", [((2, 7), 3, 16), ((3, 12), 2, 8)], ids=["T<R", "T>R:folded"])
def test_triton_backend_against_reference(dtype, lead, n, r):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src, fusion, z, h = make_case(lead=lead, n=n, r=r, d=32, dtype=dtype)
    src, fusion = [t.to(device) for t in src], [t.to(device) for t in fusion]
    z, h = z.to(device), h.to(device)
    ref64 = adapter_fusion(z.double(), *[t.double() for t in src], *[t.double() for t in fusion], h.double(),
                           backend="reference")  # fmt: skip
    same = adapter_fusion(z, *src, *fusion, h, backend="torch")
    out = adapter_fusion(z, *src, *fusion, h, backend="triton")
    _rule(out, same, ref64, atol=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.skipif(not _has_triton_backend(), reason="the core op's triton backend is not in this tree")
@pytest.mark.parametrize("tokens", [9, 40], ids=["T<R", "T>R:folded"])
def test_triton_backend_grads_match_torch(tokens):
    src, fusion, z, h = make_case(lead=(tokens,), n=2, r=8, d=32, dtype=torch.float32, seed=6)
    if torch.cuda.is_available():
        src, fusion, z, h = [t.cuda() for t in src], [t.cuda() for t in fusion], z.cuda(), h.cuda()
    kw = dict(dropout_p=0.3, training=True)
    got = _grads("triton", src, fusion, z, h, seed=8, **kw)
    expect = _grads("torch", src, fusion, z, h, seed=8, **kw)
    for a, b in zip(got, expect, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(query_weight=torch.zeros(16, 15, dtype=F64)), r"query_weight has shape \[16, 15\]"),
        (dict(key_bias=torch.zeros(3, dtype=F64)), r"key_bias has shape \[3\], expected \[16\]"),
        (dict(value_weight=torch.zeros(16, 16)), r"value_weight has dtype torch.float32"),
        (dict(z=torch.zeros(2, 5, 15, dtype=F64)), r"z has shape \[2, 5, 15\]"),
        (dict(residual=torch.zeros(2, 4, 16, dtype=F64)), r"residual has shape \[2, 4, 16\]"),
        (dict(query_input=torch.zeros(10, 16, dtype=F64)), r"query_input has shape \[10, 16\]"),
        (dict(temperature=0.0), "temperature must be a positive number"),
        (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
        (dict(scaling=torch.ones(5, dtype=F64)), r"scaling has shape \[5\]"),
        (dict(residual=None, residual_before=True), "residual_before=True"),
        (dict(query_weight=None), "query_bias was given without query_weight"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    src, fusion, z, h = make_case()
    names = ["query_weight", "query_bias", "key_weight", "key_bias", "value_weight"]
    kw = dict(zip(names, fusion, strict=True)) | dict(z=z, residual=h) | change
    z_ = kw.pop("z")
    weights = [kw.pop(k) for k in names]
    with pytest.raises(ValueError, match=match):
        adapter_fusion(z_, *src, *weights, **kw)


# ---------------------------------------------------------------- AdapterFusionLayer


def tiny_bert_with_fuse(names=("a", "b", "c"), fusion_config="dynamic", seed=0, **overrides):
    """A 2-layer random BERT (float64) with Pfeiffer adapters and a Fuse, all weights non-zero."""
    adapters = pytest.importorskip("adapters", reason="compares with the optional `adapters` library")
    from adapters import SeqBnConfig
    from adapters.composition import Fuse
    from adapters.configuration import AdapterFusionConfig
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )  # fmt: skip
    model = BertModel(config)
    adapters.init(model)
    for name in names:
        model.add_adapter(name, config=SeqBnConfig(reduction_factor=4 if name != "b" else 3))
    fuse = Fuse(*names)
    model.add_adapter_fusion(fuse, config=AdapterFusionConfig.load(fusion_config, **overrides))
    model.set_active_adapters(fuse)
    model = model.double()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "adapter" in key:
                param.add_(torch.randn_like(param) * 0.2)
    return model, ",".join(names)


def layer_from_library(output_module, fusion_name, names, backend, **options):
    from scalearn_fast.layers_fusion import AdapterFusionLayer, fusion_options_from_config

    ads = [output_module.adapters[n] for n in names]
    lib_fusion = output_module.adapter_fusion_layer[fusion_name]
    layer = AdapterFusionLayer(
        [a.adapter_down[0].weight for a in ads],
        [a.adapter_down[0].bias for a in ads],
        [a.adapter_up.weight for a in ads],
        [a.adapter_up.bias for a in ads],
        **(fusion_options_from_config(lib_fusion.config, lib_fusion.dropout.p) | options),
        backend=backend,
        layer_norm=output_module.LayerNorm,
        source_names=names,
    ).double()
    missing, unexpected = layer.load_state_dict(lib_fusion.state_dict(), strict=False)
    frozen = ("w_down", "b_down", "w_up", "b_up", "layer_norm")
    assert not unexpected and all(k.split(".")[0] in frozen for k in missing)
    return layer


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    "overrides",
    [{}, dict(residual_before=True), dict(query_before_ln=True, temperature=True), dict(value=False)],
    ids=["dynamic", "residual_before", "query_before_ln+temperature", "no_value"],
)
def test_layer_matches_adapters_sublayer(backend, overrides):
    names = ("a", "b", "c")
    model, fusion_name = tiny_bert_with_fuse(names, **overrides)
    out_mod = model.encoder.layer[1].output
    layer = layer_from_library(out_mod, fusion_name, names, backend)
    h = torch.randn(2, 5, 24, dtype=F64)
    x = torch.randn(2, 5, 24, dtype=F64)
    for training in (False, True):
        model.train(training)
        layer.train(training)
        for _ in range(2):  # temperature anneals per call in both
            torch.manual_seed(3)
            expect = out_mod.bottleneck_layer_forward(h, x, out_mod.LayerNorm)
            torch.manual_seed(3)
            got = layer(h, x)
            torch.testing.assert_close(got, expect, rtol=1e-11, atol=1e-11)
            assert layer.T == out_mod.adapter_fusion_layer[fusion_name].T


def test_layer_init_trains_and_regularises():
    from scalearn_fast.layers_fusion import AdapterFusionLayer

    src, _, z, h = make_case(d=16)
    layer = AdapterFusionLayer(*src, backend="torch").double()
    assert torch.equal(layer.value.weight.diagonal(), torch.ones(16, dtype=F64))
    assert torch.count_nonzero(layer.query.bias) == 0
    assert {p.requires_grad for p in layer.fusion_parameters()} == {True}
    assert not layer.w_down.requires_grad
    layer.compose(z, residual=h).sum().backward()
    assert layer.query.weight.grad is not None and layer.w_down.grad is None
    assert layer.regularization_loss().item() == pytest.approx(0.01 * 16 * 15 * 1e-12)
    with pytest.raises(ValueError, match="needs the layer's output LayerNorm"):
        layer(h, h)


# ---------------------------------------------------------------- the adapters checkpoint format


@pytest.mark.parametrize("safetensors", [False, True])
def test_load_fusion_checkpoint_from_adapters_save(tmp_path, safetensors):
    from scalearn_fast.models.fusion_weights import load_fusion_checkpoint

    model, fusion_name = tiny_bert_with_fuse(("a", "b"))
    model.save_adapter_fusion(str(tmp_path), fusion_name, use_safetensors=safetensors)
    ckpt = load_fusion_checkpoint(tmp_path)
    assert ckpt.name == "a,b" and ckpt.adapter_names == ["a", "b"] and sorted(ckpt.layers) == [0, 1]
    lib = model.encoder.layer[1].output.adapter_fusion_layer[fusion_name]
    for key, tensor in lib.state_dict().items():
        torch.testing.assert_close(ckpt.layers[1][key], tensor, rtol=0, atol=0)
    assert ckpt.config["value"] is True and ckpt.config["dropout_prob"] is None
    with pytest.raises(ValueError, match="adapter_fusion_config.json"):
        load_fusion_checkpoint(tmp_path / "missing")


# ---------------------------------------------------------------- the folded inference path


def _fusion_layer(backend, ranks=None, scaling=1.0, activation="relu", d=16, **options):
    from scalearn_fast.layers_fusion import AdapterFusionLayer

    src, fusion, _, _ = make_case(d=d, ranks=ranks)
    layer = AdapterFusionLayer(*src, backend=backend, scaling=scaling, activation=activation, **options)
    layer = layer.double()
    with torch.no_grad():
        pairs = ((layer.query, fusion[:2]), (layer.key, fusion[2:4]), (layer.value, fusion[4:]))
        for module, weights in pairs:
            if module is not None:
                for p, w in zip(module.parameters(), weights, strict=False):
                    p.copy_(w)
    return layer


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(residual_before=True),
        dict(query_before_ln=True, temperature=True),
        dict(value=False),
        dict(query=False),
        dict(key=False, value=False),
        dict(ranks=[2, 5, 3]),
        dict(scaling=torch.tensor([0.5, 2.0, -1.0], dtype=F64)),
        dict(activation="gelu", residual_before=True, query_before_ln=True),
    ],
    ids=["dynamic", "residual_before", "query_before_ln+temperature", "no_value", "no_query",
         "no_key_no_value", "mixed_ranks", "scaling", "gelu"],
)  # fmt: skip
def test_folded_inference_equals_the_reference(options):
    """Eval + no_grad: Q·K folded into the score weights, V into the up projections, one GEMM
    for S and the scores; same output as the reference loop (float64), τ annealing included."""
    fast, ref = _fusion_layer("torch", **options).eval(), _fusion_layer("reference", **options).eval()
    g = torch.Generator().manual_seed(5)
    h, x = (torch.randn(2, 5, 16, generator=g, dtype=F64) for _ in range(2))
    fast.layer_norm = ref.layer_norm = torch.nn.LayerNorm(16, dtype=F64)
    with torch.no_grad():
        for _ in range(2):
            got, expect = fast(h, x), ref(h, x)
            torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)
    assert fast._folded is not None and fast.T == ref.T


def test_folded_inference_follows_weight_changes_and_checks_inputs():
    layer = _fusion_layer("torch").eval()
    ref = _fusion_layer("reference").eval()
    z, h = torch.randn(3, 16, dtype=F64), torch.randn(3, 16, dtype=F64)
    with torch.no_grad():
        first = layer.compose(z, h)
        torch.testing.assert_close(first, ref.compose(z, h), rtol=1e-10, atol=1e-10)
        for mod in (layer.key, ref.key):
            mod.weight.mul_(-2.0)  # in place: the fold must be rebuilt
        torch.testing.assert_close(layer.compose(z, h), ref.compose(z, h), rtol=1e-10, atol=1e-10)
        assert not torch.allclose(layer.compose(z, h), first)
        with pytest.raises(ValueError, match=r"residual \(\[3, 15\].*must match z"):
            layer.compose(z, h[:, :15])
        with pytest.raises(ValueError, match=r"z has shape \[3, 15\]"):
            layer.compose(z[:, :15])
        with pytest.raises(ValueError, match="query_input must be a tensor or None; got float"):
            layer.compose(z, h, 2.0)
        with pytest.raises(ValueError, match="z must be a tensor; got list"):
            layer.compose(z.tolist())
    with torch.no_grad():
        low = layer.float().compose(z.float(), h.float())  # float32: a fold of its own
    err = (low.double() - ref.compose(z, h).detach()).abs().max().item()
    assert low.dtype == torch.float32 and err < 1e-4


def test_folded_inference_follows_scaling_optimizer_steps_and_empty_batches():
    layer = _fusion_layer("torch").eval()
    ref = _fusion_layer("reference").eval()
    z, h = torch.randn(3, 16, dtype=F64), torch.randn(3, 16, dtype=F64)
    opt = torch.optim.AdamW(layer.fusion_parameters() + ref.fusion_parameters(), lr=0.05, fused=True)
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(layer.compose(z, h), ref.compose(z, h), rtol=1e-10, atol=1e-10)
        (layer.compose(z, h).sum() + ref.compose(z, h).sum()).backward()
        opt.step()  # steps bump a process-wide counter the fold is keyed on
        opt.zero_grad()
    layer.scaling = ref.scaling = 0.5  # a float scaling is part of the key
    with torch.no_grad():
        torch.testing.assert_close(layer.compose(z, h), ref.compose(z, h), rtol=1e-10, atol=1e-10)
        empty = layer.compose(z[:0], h[:0])  # T = 0 with equal ranks (a [T, N, r] view)
    assert empty.shape == (0, 16)


def test_folded_inference_matches_the_adapters_library():
    names = ("a", "b", "c")
    for overrides in ({}, dict(residual_before=True), dict(query_before_ln=True)):
        model, fusion_name = tiny_bert_with_fuse(names, **overrides)
        out_mod = model.encoder.layer[1].output
        layer = layer_from_library(out_mod, fusion_name, names, "torch").eval()
        model.eval()
        h, x = torch.randn(2, 5, 24, dtype=F64), torch.randn(2, 5, 24, dtype=F64)
        with torch.no_grad():
            expect = out_mod.bottleneck_layer_forward(h, x, out_mod.LayerNorm)
            got = layer(h, x)
        assert layer._folded is not None
        torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- the folded path with gradients (T > R)


def _spy_folded(monkeypatch):
    from scalearn_fast.ops import fusion_autograd as fusion_ops

    calls = []
    real = fusion_ops.fusion_weights_folded
    monkeypatch.setattr(fusion_ops, "fusion_weights_folded", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(dropout_p=0.3, training=True),
        dict(dropout_p=0.3, training=True, temperature=3.0),
        dict(residual_before=True, temperature=2.5),
    ],
    ids=["eval", "dropout", "dropout+temperature", "residual_before"],
)
def test_folded_training_path_grads_match_reference(monkeypatch, kw):
    """With more tokens than bottleneck units the fast path folds Q·K and V into the adapters'
    weights on every call (differentiably): outputs and all gradients equal the reference."""
    calls = _spy_folded(monkeypatch)
    src, fusion, z, h = make_case(lead=(4, 8), seed=3)  # T = 32 > R = 12
    names = ["z", "residual", "query_weight", "query_bias", "key_weight", "key_bias", "value_weight"]
    ref = _grads("reference", src, fusion, z, h, seed=7, **kw)
    got = _grads("torch", src, fusion, z, h, seed=7, **kw)
    assert calls  # the folded route ran
    for name, a, b in zip(names, got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("kw", [{}, dict(dropout_p=0.3, training=True)], ids=["eval", "dropout"])
def test_gradcheck_folded_path_with_trainable_sources_and_scaling(monkeypatch, kw):
    calls = _spy_folded(monkeypatch)
    src, fusion, z, h = make_case(n=2, r=3, d=5, lead=(8,), seed=4)  # T = 8 > R = 6
    wd = src[0].clone().requires_grad_()
    scaling = torch.tensor([0.7, 1.3], dtype=F64, requires_grad=True)
    inputs = [t.clone().requires_grad_() for t in (z, h, *fusion)]

    def fn(z_, h_, qw, qb, kw_, kb, vw, wd_, s_):
        torch.manual_seed(5)
        return adapter_fusion(z_, wd_, *src[1:], qw, qb, kw_, kb, vw, h_, scaling=s_, backend="torch", **kw)

    assert torch.autograd.gradcheck(fn, (*inputs, wd, scaling))
    assert calls


def test_folded_training_path_matches_the_adapters_library_with_dropout():
    names = ("a", "b", "c")
    model, fusion_name = tiny_bert_with_fuse(names)
    out_mod = model.encoder.layer[1].output
    layer = layer_from_library(out_mod, fusion_name, names, "torch")
    h, x = torch.randn(4, 8, 24, dtype=F64), torch.randn(4, 8, 24, dtype=F64)  # T = 32 > R = 20
    assert h.shape[0] * h.shape[1] > layer.w_down.shape[0]
    model.train()
    layer.train()
    torch.manual_seed(3)
    expect = out_mod.bottleneck_layer_forward(h, x, out_mod.LayerNorm)
    torch.manual_seed(3)
    got = layer(h, x)
    torch.testing.assert_close(got, expect, rtol=1e-11, atol=1e-11)
    g_lib = torch.autograd.grad(expect.sum(), out_mod.adapter_fusion_layer[fusion_name].query.weight)
    g_ours = torch.autograd.grad(got.sum(), layer.query.weight)
    torch.testing.assert_close(g_ours[0], g_lib[0], rtol=1e-9, atol=1e-11)
