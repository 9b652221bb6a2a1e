"""The eval path of the composition sub-layers: every change to a weight the cached plan is made
from invalidates it (each of the five, in place and by new storage), the LayerNorm runs live,
and the options every sub-layer shares are checked in one place."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
import torch.nn as nn

from scalearn_fast import AdapterFusionLayer, ScaLearnLayer
from scalearn_fast.layers_base import apply_layer_norm, layer_norm_args
from scalearn_fast.ops import scaled_adapter_sum_packed

N, R, D = 3, 4, 16
WEIGHTS = ("omega", "w_down", "b_down", "w_up", "b_up")


def sources(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, R, D, generator=g) * 0.3,
        torch.randn(N, R, generator=g) * 0.1,
        torch.randn(N, D, R, generator=g) * 0.3,
        torch.randn(N, D, generator=g) * 0.1,
    )


def layer_norm():
    ln = nn.LayerNorm(D)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.2, 0.2)
    return ln


class Ref:
    """A reference to a LayerNorm (as the patched sites hold): not a module."""

    def __init__(self, module):
        self.module = module

    def __call__(self, x):
        return self.module(x)


def oracle(layer: ScaLearnLayer, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return scaled_adapter_sum_packed(
        z, layer.packed(), layer.omega, residual, activation=layer.activation, backend="reference"
    ).detach()


def check_compose(layer: ScaLearnLayer, z: torch.Tensor) -> None:
    with torch.no_grad():
        got = layer.compose(z, z)
    torch.testing.assert_close(got, oracle(layer, z, z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", WEIGHTS)
@pytest.mark.parametrize("change", ["in_place", "new_storage"])
def test_each_weight_change_invalidates_the_plan(name, change):
    layer = ScaLearnLayer(*sources(), omega_dropout=0.0, backend="torch").eval()
    z = torch.randn(5, D)
    check_compose(layer, z)
    cached = layer._folded
    check_compose(layer, z)
    assert layer._folded is cached  # nothing changed: the plan is reused
    param = getattr(layer, name)
    if change == "in_place":
        with torch.no_grad():
            param.mul_(-1.5).add_(0.25)
    else:
        param.data = param.detach() * -1.5 + 0.25  # new storage
    check_compose(layer, z)
    assert layer._folded is not cached


def test_a_changed_activation_replans():
    """Regression: the plan's key left out the activation, so setting ``layer.activation`` after
    an eval call kept computing with the old one."""
    layer = ScaLearnLayer(*sources(), omega_dropout=0.0, backend="torch").eval()
    z = torch.randn(5, D)
    check_compose(layer, z)
    layer.activation = "tanh"
    check_compose(layer, z)


def test_a_moved_layer_and_a_shared_omega_replanned():
    """A dtype move of the layer, and an in-place change of a ω shared by two layers."""
    omega = nn.Parameter(torch.full((N, 1), 0.5))
    a = ScaLearnLayer(*sources(0), variant="scalearn_uniform++", omega=omega).eval()
    b = ScaLearnLayer(*sources(1), variant="scalearn_uniform++", omega=omega).eval()
    z = torch.randn(4, D)
    for layer in (a, b):
        check_compose(layer, z)
    with torch.no_grad():
        omega.mul_(3.0)
    for layer in (a, b):
        check_compose(layer, z)
    a.double()
    check_compose(a, z.double())
    assert a._folded[1].sources_and_coefficients[6].dtype == torch.float64


def test_unpickled_layer_follows_a_fused_optimizer_step():
    layer = pickle.loads(pickle.dumps(ScaLearnLayer(*sources(), omega_dropout=0.0, backend="torch").eval()))
    z = torch.randn(4, D)
    check_compose(layer, z)
    layer.omega.grad = torch.ones_like(layer.omega)
    torch.optim.SGD([layer.omega], lr=0.5, fused=True).step()
    check_compose(layer, z)


@pytest.mark.parametrize("holder", ["module", "reference"])
def test_sublayer_layer_norm_runs_live(holder):
    """The LayerNorm is read on every call (its weights may change between calls)."""
    ln = layer_norm()
    held = ln if holder == "module" else Ref(ln)
    layer = ScaLearnLayer(*sources(), omega_dropout=0.0, backend="torch", layer_norm=held).eval()
    s = torch.randn(2, 3, D)
    for _ in range(2):
        with torch.no_grad():
            got = layer.forward_summed(s)
        expect = ln(oracle(layer, ln(s).reshape(-1, D), s.reshape(-1, D)).reshape(s.shape))
        torch.testing.assert_close(got, expect.detach(), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            ln.weight.mul_(1.7)  # in place: the next call sees it


def test_layer_norm_args_only_for_layer_norms():
    ln = layer_norm()
    x = torch.randn(3, D)
    assert layer_norm_args(ln) == (ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    assert layer_norm_args(Ref(ln))[1] is ln.weight
    rms = nn.RMSNorm(D)
    assert layer_norm_args(rms) is None and layer_norm_args(torch.tanh) is None
    torch.testing.assert_close(apply_layer_norm(Ref(ln), x), ln(x))
    torch.testing.assert_close(apply_layer_norm(rms, x), rms(x))


@pytest.mark.parametrize("cls", [ScaLearnLayer, AdapterFusionLayer])
def test_shared_site_options_are_checked_in_one_place(cls):
    assert "pre_ln" in inspect.signature(cls).parameters  # attach reads it to allow pre-LN sites
    layer = cls(*sources(), activation="gelu", backend="torch", source_names=["a", "b", "c"])
    assert (layer.activation, layer.backend, layer.source_names, layer.pre_ln) == (
        "gelu",
        "torch",
        ["a", "b", "c"],
        False,
    )
    with pytest.raises(ValueError, match="activation must be one of"):
        cls(*sources(), activation="softsign")
    with pytest.raises(ValueError, match=rf"{cls.__name__}: pre_ln=True applies no LayerNorm"):
        cls(*sources(), pre_ln=True, layer_norm=layer_norm())
    with pytest.raises(ValueError, match="source_names holds 2 names for N=3"):
        cls(*sources(), source_names=["a", "b"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'layernorm'"):
        cls(*sources(), layernorm=layer_norm())


# ------------------------------------------------------------------ the prepared inference runner


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh", "identity"])
@pytest.mark.parametrize("rows", [(5,), (2, 3)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_inference_runner_equals_the_reference(activation, rows, with_residual):
    """The runner a plan keeps (the torch backend's two GEMMs, built once) against the reference
    loop with ω applied, for z [T, d] and [B, T, d], with and without a residual."""
    from scalearn_fast.ops.algebra import scale_up_projections
    from scalearn_fast.ops.backends import triton_available, triton_interpreted
    from scalearn_fast.ops.composition import Composition
    from scalearn_fast.ops.dispatch import inference_runner

    layer = ScaLearnLayer(*sources(3), activation=activation, omega_dropout=0.0, backend="torch").eval()
    packed = layer.packed()
    up, bias = scale_up_projections(layer.w_up, layer.b_up, layer.omega.detach(), layer.source_index)
    template = Composition(
        None, packed.w_down, packed.b_down, packed.w_up, packed.b_up, packed.source_index,
        None, up.contiguous(), bias.contiguous(), None, None, activation,
    )  # fmt: skip
    g = torch.Generator().manual_seed(4)
    z = torch.randn(*rows, D, generator=g)
    residual = torch.randn(*rows, D, generator=g) if with_residual else None
    want = scaled_adapter_sum_packed(
        z, packed, layer.omega, residual, activation=activation, backend="reference"
    )
    backends = ["torch"]  # the torch backend's own runner; the triton one goes through ``infer``
    if triton_available() and triton_interpreted():
        backends.append("triton")
    for backend in backends:
        with torch.no_grad():
            got = inference_runner(template, backend)(z, None if residual is None else residual.clone())
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"last dim must equal the sources' hidden size d=16"):
        inference_runner(template, "torch")(torch.randn(5, D + 1), None)


def test_a_pickled_layer_drops_its_cache_and_replans():
    """The plan holds closures over the folded weights: a pickled or copied layer leaves the cache
    behind and builds its own on its first eval call (regression: pickling an evaluated layer
    failed on the runner)."""
    layer = ScaLearnLayer(*sources(), omega_dropout=0.0, backend="torch").eval()
    z = torch.randn(5, D)
    check_compose(layer, z)
    assert layer._folded is not None
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert clone._folded is None
        with torch.no_grad():
            clone.omega.mul_(2.0)  # the clone's own weights, not the original's, are folded
        check_compose(clone, z)
    check_compose(layer, z)


# ------------------------------------------------------------------ the patched output site


def _tiny_bert_with_scalearn():
    from tiny_attached_bert import tiny_bert_with

    return tiny_bert_with("scalearn", sources=("a", "b"))


def test_output_site_keeps_hooks_and_training_dropout_of_its_dense_and_dropout():
    """In eval the patched BERT output site runs its dense layer as one ATen call; a hook on the
    dense layer or the dropout, or a dropout left in training mode, must still take effect."""
    model = _tiny_bert_with_scalearn()
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
    output = model.encoder.layer[0].output
    for module in (output.dense, output.dropout):
        calls = []
        handle = module.register_forward_hook(lambda m, i, o, calls=calls: calls.append(1) or o * 0.5)
        with torch.no_grad():
            hooked = model(input_ids=ids).last_hidden_state
        handle.remove()
        assert calls, f"the hook on {type(module).__name__} did not run"
        assert (hooked - base).abs().max() > 1e-3  # its changed output reached the sub-layer
    output.dropout.p = 0.5
    output.dropout.train()
    with torch.no_grad():
        dropped = model(input_ids=ids).last_hidden_state
    assert (dropped - base).abs().max() > 1e-3
    output.dropout.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, base)


FUSION_WEIGHTS = (
    "w_down", "b_down", "w_up", "b_up", "query.weight", "query.bias", "key.weight", "value.weight",
)  # fmt: skip


@pytest.mark.parametrize("name", FUSION_WEIGHTS)
@pytest.mark.parametrize("change", ["in_place", "new_storage"])
def test_each_fusion_weight_change_invalidates_the_fold(name, change):
    """AdapterFusion's cached fold (and its runner) against the layer's own train-mode formula
    without dropout, after each weight changes in place or gets new storage."""
    layer = AdapterFusionLayer(*sources(), dropout=0.0, backend="torch").eval()
    with torch.no_grad():
        layer.value.weight.normal_(0.0, 0.3)  # not the identity: every projection matters
    z = torch.randn(5, D)

    def check() -> None:
        with torch.no_grad():
            got = layer.compose(z, z)
            want = copy.deepcopy(layer).train().compose(z, z)  # the unfolded path (dropout 0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    check()
    cached = layer._folded
    check()
    assert layer._folded is cached
    param = layer.get_parameter(name)
    if change == "in_place":
        with torch.no_grad():
            param.mul_(-1.5).add_(0.25)
    else:
        param.data = param.detach() * -1.5 + 0.25
    check()
    assert layer._folded is not cached
