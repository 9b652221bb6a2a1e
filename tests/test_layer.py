"""ScaLearnLayer: variants, ω initialisation and dropout, the sub-layer form, the eval cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from scalearn_fast import VARIANTS, ScaLearnLayer, init_omega
from scalearn_fast.ops import scaled_adapter_sum_packed

N, R, D = 4, 6, 32


def sources(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, R, D, generator=g, dtype=dtype) * 0.2,
        torch.randn(N, R, generator=g, dtype=dtype) * 0.1,
        torch.randn(N, D, R, generator=g, dtype=dtype) * 0.2,
        torch.randn(N, D, generator=g, dtype=dtype) * 0.1,
    )


def layer_norm(seed=1):
    ln = nn.LayerNorm(D)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.1 * torch.randn(D, generator=g))
        ln.bias.copy_(0.1 * torch.randn(D, generator=g))
    return ln


def manual_sublayer(layer: ScaLearnLayer, h, x, omega):
    """LN(Σ_i ω_i ⊙ A_i(LN(h + x)) + h + x), written out per adapter."""
    wd, bd, wu, bu = sources()
    z = layer.layer_norm(h + x)
    total = sum(omega[i] * (torch.relu(z @ wd[i].T + bd[i]) @ wu[i].T + bu[i]) for i in range(N))
    return layer.layer_norm(total + h + x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sublayer_forward_matches_the_formula(variant):
    layer = ScaLearnLayer(*sources(), variant=variant, layer_norm=layer_norm(), backend="torch").eval()
    h, x = torch.randn(2, 7, D), torch.randn(2, 7, D)
    expected = manual_sublayer(layer, h, x, layer.omega.detach())
    with torch.no_grad():
        torch.testing.assert_close(layer(h, x), expected, rtol=1e-5, atol=1e-5)
    cols = 1 if "uniform" in variant else D
    assert layer.omega.shape == (N, cols)


def test_omega_initialisation_statistics():
    omega = init_omega(8, 4096, "scalearn", generator=torch.Generator().manual_seed(0))
    assert omega.shape == (8, 4096) and omega.requires_grad
    assert abs(omega.mean().item() - 2 / 8) < 1e-4
    assert abs(omega.std().item() - 1e-3) < 1e-4
    assert init_omega(8, 4096, "scalearn_uniform++").shape == (8, 1)


def test_omega_dropout_defaults_and_training_behaviour():
    assert ScaLearnLayer(*sources()).omega_dropout == 0.3
    assert ScaLearnLayer(*sources(), variant="scalearn_uniform++").omega_dropout == 0.0
    layer = ScaLearnLayer(*sources(), omega_dropout=0.5).train()
    torch.manual_seed(0)
    dropped = layer.effective_omega()
    kept = dropped != 0
    assert 0.3 < kept.float().mean().item() < 0.7
    torch.testing.assert_close(dropped[kept], (layer.omega * 2)[kept])  # inverted-dropout scaling
    assert torch.equal(layer.eval().effective_omega(), layer.omega)
    with pytest.raises(ValueError, match="omega_dropout must be in"):
        ScaLearnLayer(*sources(), omega_dropout=1.0)


def test_only_omega_trains_and_gets_a_gradient():
    layer = ScaLearnLayer(*sources(), layer_norm=layer_norm(), omega_dropout=0.0).train()
    h, x = torch.randn(3, D), torch.randn(3, D)
    layer(h, x).square().sum().backward()
    assert layer.omega.grad is not None and layer.omega.grad.abs().sum() > 0
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"omega", "layer_norm.weight", "layer_norm.bias"}
    assert layer.w_down.grad is None


def test_shared_omega_for_plus_plus_variants():
    shared = init_omega(N, D, "scalearn++")
    layers = [
        ScaLearnLayer(*sources(s), variant="scalearn++", omega=shared, omega_dropout=0.0) for s in range(3)
    ]
    assert all(layer.omega is shared for layer in layers)
    z = torch.randn(5, D)
    sum(layer.compose(z).sum() for layer in layers).backward()
    single = init_omega(N, D, "scalearn++")
    with torch.no_grad():
        single.copy_(shared)
    ScaLearnLayer(*sources(0), variant="scalearn++", omega=single, omega_dropout=0.0).compose(
        z
    ).sum().backward()
    assert not torch.allclose(shared.grad, single.grad)  # gradients from all three layers add up
    with pytest.raises(ValueError, match=r"omega has shape \[4, 32\], expected \[4, 1\]"):
        ScaLearnLayer(*sources(), variant="scalearn_uniform++", omega=shared)


def test_eval_cache_is_used_and_invalidated_when_omega_changes():
    layer = ScaLearnLayer(*sources(), omega_dropout=0.0, backend="torch").eval()
    z = torch.randn(6, D)
    with torch.no_grad():
        first = layer.compose(z)
        cached = layer._folded
        assert cached is not None
        torch.testing.assert_close(layer.compose(z), first, rtol=0, atol=0)
        assert layer._folded is cached  # no refold for an unchanged ω
        layer.omega.mul_(-1.5)  # in-place change bumps the version counter
        changed = layer.compose(z)
    assert layer._folded is not cached
    layer.train()
    torch.testing.assert_close(changed, layer.compose(z).detach(), rtol=1e-6, atol=1e-6)
    layer.eval()
    layer.omega = nn.Parameter(torch.zeros_like(layer.omega))  # replaced parameter
    with torch.no_grad():
        torch.testing.assert_close(layer.compose(z), torch.zeros_like(z) + 0.0, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "adamw_fused"])
def test_eval_cache_follows_optimizer_steps_taken_in_eval_mode(fused):
    """A fused AdamW (the HF Trainer's default) updates ω without bumping its version counter."""
    layer = ScaLearnLayer(*sources(), omega_dropout=0.0, backend="torch").eval()
    opt = torch.optim.AdamW([layer.omega], lr=0.1, fused=fused)
    z = torch.randn(5, D)

    def oracle():
        return scaled_adapter_sum_packed(z, layer.packed(), layer.omega, backend="reference").detach()

    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(layer.compose(z), oracle(), rtol=1e-6, atol=1e-6)
        layer.compose(z).square().sum().backward()  # ω requires grad: the unfolded path
        opt.step()
        opt.zero_grad()


def test_eval_cache_follows_replaced_storage_and_explicit_invalidation():
    layer = ScaLearnLayer(*sources(), omega_dropout=0.0, backend="torch").eval()
    z = torch.randn(5, D)

    def check():
        with torch.no_grad():
            got = layer.compose(z)
        expect = scaled_adapter_sum_packed(z, layer.packed(), layer.omega, backend="reference").detach()
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)

    check()
    layer.b_up.data = torch.randn_like(layer.b_up)  # new storage
    check()
    layer.load_state_dict({"b_down": torch.randn_like(layer.b_down)}, strict=False, assign=True)
    check()
    layer.omega.data.mul_(2.0)  # .data edits are not tracked by PyTorch: invalidate by hand
    layer.invalidate_cache()
    check()
    layer.omega.data.mul_(-1.0)
    layer.train()  # so does a train/eval switch
    layer.eval()
    check()


def test_layers_built_under_inference_mode_run_uncached():
    from scalearn_fast import AdapterFusionLayer

    with torch.inference_mode():
        layer = ScaLearnLayer(*sources(), omega_dropout=0.0, backend="torch").eval()
        fusion = AdapterFusionLayer(*sources(), backend="torch").eval()
        z = torch.randn(5, D)
        expect = scaled_adapter_sum_packed(z, layer.packed(), layer.omega, backend="reference")
        torch.testing.assert_close(layer.compose(z), expect, rtol=1e-6, atol=1e-6)
        layer.omega.mul_(3.0)  # inference tensors have no version counter: nothing may be cached
        expect = scaled_adapter_sum_packed(z, layer.packed(), layer.omega, backend="reference")
        torch.testing.assert_close(layer.compose(z), expect, rtol=1e-6, atol=1e-6)
        assert fusion.compose(z).shape == z.shape


def test_eval_path_checks_inputs_and_follows_source_and_dtype_changes():
    layer = ScaLearnLayer(*sources(), omega_dropout=0.0, backend="torch").eval()
    z, res = torch.randn(2, 3, D), torch.randn(2, 3, D)

    def oracle():
        return scaled_adapter_sum_packed(z, layer.packed(), layer.omega, res, backend="reference").detach()

    with torch.no_grad():
        torch.testing.assert_close(layer.compose(z, res), oracle(), rtol=1e-6, atol=1e-6)
        layer.w_up.mul_(0.5)  # a source changed in place: the folded plan must follow
        layer.b_down.add_(0.25)
        torch.testing.assert_close(layer.compose(z, res), oracle(), rtol=1e-6, atol=1e-6)
        half = layer.compose(z.double(), res.double())  # another dtype: a plan of its own
        assert half.dtype == torch.float64
        torch.testing.assert_close(half.float(), oracle(), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"z has shape \[2, 3, 31\].*d=32"):
            layer.compose(torch.randn(2, 3, D - 1))
        with pytest.raises(ValueError, match=r"residual \(\[2, 4, 32\].*must match z"):
            layer.compose(z, torch.randn(2, 4, D))
        with pytest.raises(ValueError, match=r"residual .*torch.float64.*must match z"):
            layer.compose(z, res.double())
        with pytest.raises(ValueError, match="z must be a floating-point tensor"):
            layer.compose(torch.ones(2, D, dtype=torch.long))
        with pytest.raises(ValueError, match="w_down is on cpu but z is on meta"):
            layer.compose(z.to("meta"))
        with pytest.raises(ValueError, match="residual must be a tensor or None; got float"):
            layer.compose(z, 1.0)
        with pytest.raises(ValueError, match="z must be a tensor; got ndarray"):
            layer.compose(z.numpy())
    with pytest.raises(ValueError, match="residual must be a tensor or None; got float"):
        layer.compose(z, 1.0)  # with grad enabled too


def test_mixed_precision_keeps_fp32_omega_master():
    layer = ScaLearnLayer(*sources(), omega_dropout=0.0, backend="torch").train()
    z = torch.randn(5, D, dtype=torch.bfloat16)
    out = layer.compose(z)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.omega.grad.dtype == torch.float32
    ref = layer.compose(z.float()).detach()
    assert (out.float() - ref).abs().max() < 5e-2


def test_heterogeneous_sources_and_names():
    g = torch.Generator().manual_seed(0)
    ranks = [2, 5, 3]
    layer = ScaLearnLayer(
        [torch.randn(r, D, generator=g) for r in ranks],
        [torch.zeros(r) for r in ranks],
        [torch.randn(D, r, generator=g) for r in ranks],
        [torch.zeros(D) for _ in ranks],
        source_names=["sst2", "qnli", "mnli"],
    )
    assert layer.ranks == (2, 5, 3) and layer.w_down.shape == (10, D)
    assert "ranks=[2, 5, 3]" in repr(layer)
    with pytest.raises(ValueError, match="source_names holds 2 names for N=3"):
        ScaLearnLayer(
            *[[t] * 3 for t in (torch.randn(2, D), torch.zeros(2), torch.randn(D, 2), torch.zeros(D))],
            source_names=["a", "b"],
        )


def test_forward_needs_layer_norm_and_matching_shapes():
    layer = ScaLearnLayer(*sources())
    with pytest.raises(ValueError, match="needs the layer's output LayerNorm"):
        layer(torch.randn(2, D), torch.randn(2, D))
    layer.layer_norm = layer_norm()
    with pytest.raises(ValueError, match=r"hidden_states has shape \[2, 32\] but input_tensor has \[3, 32\]"):
        layer(torch.randn(2, D), torch.randn(3, D))
    with pytest.raises(ValueError, match="variant must be one of"):
        ScaLearnLayer(*sources(), variant="scalearn+++")


def test_layer_compiles_without_graph_breaks():
    layer = ScaLearnLayer(*sources(), layer_norm=layer_norm(), omega_dropout=0.0, backend="torch").train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    h, x = torch.randn(2, 3, D), torch.randn(2, 3, D)
    out = compiled(h, x)
    torch.testing.assert_close(out, layer(h, x))
    out.sum().backward()
    assert layer.omega.grad is not None
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(h, x), layer(h, x))


def test_reference_backend_layer_runs_the_loop_in_eval():
    layer = ScaLearnLayer(*sources(), backend="reference").eval()
    with torch.no_grad():
        layer.compose(torch.randn(3, D))
    assert layer._folded is None  # no ω folding: the oracle stays the literal per-adapter loop
