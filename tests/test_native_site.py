"""The native sites (scalearn_fast/site_extension, models/native_site.py), output and summed,
for AdapterFusion and ScaLearn, against the Python eval path they stand in for: bitwise equal
outputs; every change the Python path would see (a weight, a mode, a hook, a setting, a replaced
module) sends the call back to Python; inputs they are not for (something to differentiate,
another dtype, a subclass, bad shapes) get the Python path's behaviour and errors."""

from __future__ import annotations

import copy
import os
import pickle
import shutil
from typing import Any

import pytest
import torch
import torch.nn as nn
from tiny_attached_bert import D, tiny_bert_with

from scalearn_fast import site_extension
from scalearn_fast.models import patching


@pytest.fixture(scope="module")
def extension():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the native site cannot be built here")
    return site_extension.build()  # must build where a compiler is


KINDS = ("fusion", "scalearn")


def _tiny_bert(kind: str):
    model = tiny_bert_with(kind)
    with torch.no_grad():
        for layer in _sublayers(model):
            # not the identity or ones: every projection and scale matters
            (layer.value.weight if kind == "fusion" else layer.omega).normal_(0.0, 0.3)
    return model


def _sublayers(model: nn.Module) -> list[nn.Module]:
    names = ("AdapterFusionLayer", "ScaLearnLayer")
    return [m for m in model.modules() if type(m).__name__ in names]


def _trained_weight(model: nn.Module, kind: str) -> nn.Parameter:
    layer = _sublayers(model)[0]
    return layer.query.weight if kind == "fusion" else layer.omega


def _warmed(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A model whose sites hold native sites (one eval call made), and its input ids."""
    model, ids = _tiny_bert(kind), _ids()
    with torch.no_grad():
        model(input_ids=ids)
    return model, ids


def _site_forwards(model: nn.Module) -> list[patching.SiteForward]:
    return [f for m in model.modules() if isinstance(f := m.__dict__.get("forward"), patching.SiteForward)]


def _in_python(model: nn.Module, **inputs) -> Any:
    """The model's output with every site in Python (the native sites restored after)."""
    forwards = _site_forwards(model)
    saved = [(f.native, f.allow_native) for f in forwards]
    for f in forwards:
        f.native, f.allow_native = None, False
    try:
        return model(**inputs)
    finally:
        for f, (site, allow) in zip(forwards, saved, strict=True):
            f.native, f.allow_native = site, allow


def _python_output(model: nn.Module, **inputs) -> torch.Tensor:
    return _in_python(model, **inputs).last_hidden_state


def _ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def python_path_forbidden(monkeypatch):
    """Make the Python output path raise: a call that still answers went native."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the Python output path ran")

    return lambda: monkeypatch.setitem(patching._STYLES, "output", forbidden)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_site_is_bitwise_the_python_path(extension, python_path_forbidden, kind, activation, dtype):
    model = _tiny_bert(kind).to(dtype)
    for layer in _sublayers(model):
        layer.activation = activation
    ids = _ids()
    with torch.no_grad():
        want = _python_output(model, input_ids=ids)
        model(input_ids=ids)  # the Python path answers and builds the native sites
        assert all(f.native is not None for f in _site_forwards(model))
        python_path_forbidden()
        got = model(input_ids=ids).last_hidden_state
    assert torch.equal(got, want)


def _sublayer(model):
    return _sublayers(model)[0]


def _scale_(t: torch.Tensor) -> None:
    with torch.no_grad():
        t.mul_(-1.5).add_(0.25)


def _new_storage(t: torch.Tensor) -> None:
    t.data = t.detach() * -2.0 + 0.1


def _output(model):
    return model.encoder.layer[0].output


def _train_dropout(model) -> None:
    _output(model).dropout.p = 0.5
    _output(model).dropout.train()


def _fixed_temperature(model) -> None:
    layer = _sublayer(model)
    layer.T, layer.reduction = 3.0, 0.0


# each change, and the kinds it applies to
CHANGES = {
    "query weight in place": (("fusion",), lambda m: _scale_(_sublayer(m).query.weight)),
    "key weight new storage": (("fusion",), lambda m: _new_storage(_sublayer(m).key.weight)),
    "omega in place": (("scalearn",), lambda m: _scale_(_sublayer(m).omega)),
    "up weights new storage": (KINDS, lambda m: _new_storage(_sublayer(m).w_up)),
    "down weights in place": (KINDS, lambda m: _scale_(_sublayer(m).w_down)),
    "dense weight in place": (KINDS, lambda m: _scale_(_output(m).dense.weight)),
    "dense replaced": (KINDS, lambda m: setattr(_output(m), "dense", nn.Linear(24, D))),
    "layer norm in place": (KINDS, lambda m: _scale_(_output(m).LayerNorm.weight)),
    "layer norm eps": (KINDS, lambda m: setattr(_output(m).LayerNorm, "eps", 0.5)),
    "activation": (KINDS, lambda m: setattr(_sublayer(m), "activation", "tanh")),
    "temperature": (("fusion",), _fixed_temperature),
    "backend": (KINDS, lambda m: setattr(_sublayer(m), "backend", "reference")),
    "hook on dense": (KINDS, lambda m: _output(m).dense.register_forward_hook(lambda mod, i, o: o * 0.5)),
    "hook on the sub-layer": (KINDS, lambda m: _sublayer(m).register_forward_hook(lambda mod, i, o: o * 0.5)),
    "global hook": (
        KINDS,
        lambda m: nn.modules.module.register_module_forward_hook(
            lambda mod, i, o: o * 0.5 if isinstance(mod, nn.Linear) else None
        ),
    ),
    "dropout in training mode": (KINDS, _train_dropout),
}
CASES = [(kind, change) for change, (kinds, _) in sorted(CHANGES.items()) for kind in kinds]


@pytest.mark.parametrize(("kind", "change"), CASES)
def test_each_change_sends_the_call_back_to_python(extension, kind, change):
    """After each change the model's output is the Python path's on the changed model (a stale
    native site would give the old output, which differs)."""
    model = _tiny_bert(kind)
    ids = _ids()
    with torch.no_grad():
        model(input_ids=ids)
        before = model(input_ids=ids).last_hidden_state
        assert all(f.native is not None for f in _site_forwards(model))
    handle = CHANGES[change][1](model)
    try:
        torch.manual_seed(5)
        with torch.no_grad():
            got = model(input_ids=ids).last_hidden_state
            torch.manual_seed(5)
            want = _python_output(model, input_ids=ids)
    finally:
        if hasattr(handle, "remove"):
            handle.remove()
    assert not torch.equal(got, before)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_an_optimizer_step_makes_it_stale(extension, kind):
    model, ids = _warmed(kind)
    weight = _trained_weight(model, kind)
    weight.grad = torch.ones_like(weight)
    torch.optim.SGD([weight], lr=0.1).step()  # a version bump, and the step counter
    forward = _site_forwards(model)[0]
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
        want = _python_output(model, input_ids=ids)
    assert torch.equal(got, want)
    assert forward.native is not None  # rebuilt


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_and_training_take_the_python_path(extension, kind):
    model, ids = _warmed(kind)
    out = model(input_ids=ids).last_hidden_state  # grad mode: the trained weights want gradients
    out.sum().backward()
    assert _trained_weight(model, kind).grad is not None
    model.train()
    with torch.no_grad():
        model(input_ids=ids)
    assert all(f.native is None for f in _site_forwards(model))  # nothing to build in training


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_it_is_not_for_get_the_python_path(extension, kind):
    model = _tiny_bert(kind)
    output = model.encoder.layer[0].output
    h, x = torch.randn(2, 7, 24), torch.randn(2, 7, D)
    with torch.no_grad():
        want = output(h, x)
        assert torch.equal(output(h, x), want)  # native
        with pytest.raises(ValueError, match="hidden_states has shape"):
            output(h, torch.randn(2, 6, D))  # the Python path's own error
        with pytest.raises(RuntimeError):
            output(h.double(), x)
        with torch.inference_mode():
            assert torch.equal(output(h.clone(), x.clone()), want)
    seen = []

    class Traced(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    with torch.no_grad():
        got = output(h.as_subclass(Traced), x)
    assert seen  # the subclass saw the calls: they ran in Python
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=0, atol=0)
    h.requires_grad_(True)
    output(h, x).sum().backward()
    assert h.grad is not None


@pytest.mark.parametrize("kind", KINDS)
def test_copies_and_pickles_drop_the_native_site(extension, kind):
    model = _tiny_bert(kind)
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        model(input_ids=ids)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert all(f.native is None for f in _site_forwards(clone))
            assert torch.equal(clone(input_ids=ids).last_hidden_state, want)
            assert all(f.native is not None for f in _site_forwards(clone))


def test_mode_setting(monkeypatch):
    monkeypatch.setenv("SCALEARN_FAST_NATIVE", "0")
    assert site_extension.extension() is None
    monkeypatch.setenv("SCALEARN_FAST_NATIVE", "yes")
    with pytest.raises(ValueError, match="SCALEARN_FAST_NATIVE must be one of"):
        site_extension.extension()


def test_torch_compile_traces_the_python_path(extension):
    """Under ``torch.compile`` the site runs the Python path (dynamo traces it); a native site
    built by an eager call before stays in place for the eager calls after."""
    model = _tiny_bert("scalearn")
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        model(input_ids=ids)
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(compiled(input_ids=ids).last_hidden_state, want, rtol=1e-6, atol=1e-6)
        assert all(f.native is not None for f in _site_forwards(model))
        assert torch.equal(model(input_ids=ids).last_hidden_state, want)


def test_a_broken_build_warns_and_python_serves(monkeypatch, tmp_path):
    """Under ``auto`` a library in the cache that does not load is not used, with a warning;
    under ``1`` the error is raised."""
    monkeypatch.setenv("SCALEARN_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(site_extension, "_loaded", {})
    folder = site_extension.build_directory()
    folder.mkdir(parents=True)
    (folder / f"{site_extension._name()}.so").write_bytes(b"not a shared library")
    monkeypatch.setenv("SCALEARN_FAST_NATIVE", "auto")
    with pytest.warns(RuntimeWarning, match="do not load"):
        assert site_extension.extension() is None
    model, ids = tiny_bert_with("fusion"), _ids()
    with torch.no_grad():
        want = _python_output(model, input_ids=ids)
        assert torch.equal(model(input_ids=ids).last_hidden_state, want)
    assert all(f.native is None for f in _site_forwards(model))
    monkeypatch.setenv("SCALEARN_FAST_NATIVE", "1")
    with pytest.raises(ImportError):
        site_extension.extension()


# ------------------------------------------------------------------ summed sites (translation)

SEQ2SEQ = ("marian", "mbart")  # post-LN (final_layer_norm) and pre-LN (the whole layer)


def _seq2seq(family: str, kind: str) -> nn.Module:
    import transformers as tf

    from scalearn_fast.models import attach_fusion, attach_scalearn, ffn_sites

    torch.manual_seed(0)
    d = 16
    shape = dict(
        d_model=d, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=40, max_position_embeddings=32,
    )  # fmt: skip
    if family == "mbart":
        model = tf.MBartForConditionalGeneration(tf.MBartConfig(**shape))
    else:
        model = tf.MarianMTModel(tf.MarianConfig(**shape, decoder_vocab_size=40, pad_token_id=1))
    g = torch.Generator().manual_seed(1)
    shapes = ((4, d), (4,), (d, 4), (d,))
    srcs = {
        name: {s.key: tuple(torch.randn(*sh, generator=g) * 0.3 for sh in shapes) for s in ffn_sites(model)}
        for name in ("a", "b", "c")
    }
    if kind == "fusion":
        attach_fusion(model, srcs, backend="torch", fusion_config={"dropout_prob": 0.0})
    else:
        attach_scalearn(model, srcs, backend="torch")
    with torch.no_grad():
        for layer in _sublayers(model):
            (layer.value.weight if kind == "fusion" else layer.omega).normal_(0.0, 0.3)
    return model.eval()


def _seq2seq_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "input_ids": torch.randint(3, 40, (2, 6), generator=g),
        "decoder_input_ids": torch.randint(3, 40, (2, 4), generator=g),
    }


def _logits_in_python(model: nn.Module, inputs: dict) -> torch.Tensor:
    return _in_python(model, **inputs).logits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_summed_sites_are_bitwise_the_python_path(extension, monkeypatch, family, kind):
    model = _seq2seq(family, kind)
    inputs = _seq2seq_inputs()
    with torch.no_grad():
        want = _logits_in_python(model, inputs)
        model(**inputs)  # builds the native sites
        assert _site_forwards(model) and all(f.native is not None for f in _site_forwards(model))
        layer_type = type(_sublayers(model)[0])

        def forbidden(*args, **kwargs):
            raise AssertionError("the Python summed path ran")

        monkeypatch.setattr(layer_type, "forward_summed", forbidden)
        got = model(**inputs).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_summed_sites_follow_changes_and_decode_like_python(extension, family, kind):
    model = _seq2seq(family, kind)
    inputs = _seq2seq_inputs()
    with torch.no_grad():
        model(**inputs)
        before = model(**inputs).logits
        _scale_(_trained_weight(model, kind))
        _sublayers(model)[-1].register_forward_hook(lambda mod, i, o: o * 0.5)  # its site goes to Python
        got = model(**inputs).logits
        want = _logits_in_python(model, inputs)
        assert not torch.equal(got, before)
        assert torch.equal(got, want)
        kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=1, decoder_start_token_id=2)
        generated = model.generate(inputs["input_ids"], **kwargs)
        for f in _site_forwards(model):
            f.native, f.allow_native = None, False
        assert torch.equal(generated, model.generate(inputs["input_ids"], **kwargs))
