"""``AdapterFusionLayer`` under ``torch.compile(fullgraph=True)``: no graph break, the same output
as eager in training (with score dropout, same RNG state) and in eval, and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from scalearn_fast.layers_fusion import AdapterFusionLayer

D = 16


def _layer(ranks, **options) -> AdapterFusionLayer:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    layer = AdapterFusionLayer(
        [rnd(r, D) for r in ranks],
        [rnd(r) for r in ranks],
        [rnd(D, r) for r in ranks],
        [rnd(D) for r in ranks],
        layer_norm=torch.nn.LayerNorm(D),
        backend="torch",
        **options,
    )
    with torch.no_grad():
        for p in layer.fusion_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return layer


@pytest.mark.parametrize(
    "ranks, options",
    [((4, 4, 4), {}), ((2, 5, 3), dict(residual_before=True, query_before_ln=True, temperature=True))],
    ids=["equal_ranks", "mixed_ranks+residual_before+query_before_ln+temperature"],
)
def test_layer_compiles_fullgraph_and_matches_eager(ranks, options):
    torch._dynamo.reset()
    layer = _layer(ranks, dropout=0.0, **options)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    h, x = torch.randn(2, 3, D), torch.randn(2, 3, D)
    for tokens in ((2, 3), (4, 8)):  # T <= R and T > R (the per-call folds)
        h, x = torch.randn(*tokens, D), torch.randn(*tokens, D)
        torch.manual_seed(1)
        out = compiled(h, x)
        torch.manual_seed(1)
        expect = eager(h, x)
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
        out.sum().backward()
        expect.sum().backward()
        torch.testing.assert_close(layer.query.weight.grad, eager.query.weight.grad, rtol=1e-4, atol=1e-6)
        assert layer.T == eager.T
    layer.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(h, x), eager(h, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled(h, x), eager(h, x), rtol=1e-5, atol=1e-6)


def test_layer_compiles_fullgraph_with_score_dropout_in_training():
    """Score dropout under compile: no graph break, a finite output that differs from eval, and
    gradients reach the fusion weights (the compiled RNG draws differ from eager's)."""
    torch._dynamo.reset()
    layer = _layer((3, 3), dropout=0.5).train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    h, x = torch.randn(4, 8, D), torch.randn(4, 8, D)
    out = compiled(h, x)
    assert out.shape == h.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert layer.key.weight.grad is not None and layer.key.weight.grad.abs().max() > 0
    with torch.no_grad():
        assert (out - layer.eval()(h, x)).abs().max() > 1e-6
