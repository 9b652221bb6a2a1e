"""The eval fold of ``AdapterFusionLayer`` (``ops.fusion_infer``: padded blocks with a constant
unit per source) against the float64 reference layer, for every activation, with and without a
separate query input, equal and mixed ranks, strided inputs and T = 0."""

from __future__ import annotations

import pytest
import torch

from scalearn_fast.layers_fusion import AdapterFusionLayer
from scalearn_fast.ops.activations import ACTIVATIONS

F64 = torch.float64
D = 12


def _pair(ranks, activation, **options):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, std=0.4):
        return torch.randn(*shape, generator=g, dtype=F64) * std

    src = (
        [rnd(r, D) for r in ranks],
        [rnd(r) for r in ranks],
        [rnd(D, r) for r in ranks],
        [rnd(D) for r in ranks],
    )
    layers = []
    for backend in ("torch", "reference"):
        torch.manual_seed(1)  # the same fusion weights in both
        layer = AdapterFusionLayer(*src, activation=activation, backend=backend, **options).double().eval()
        layer.layer_norm = torch.nn.LayerNorm(D, dtype=F64)
        with torch.no_grad():
            for p in layer.fusion_parameters():
                p.add_(
                    torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=F64) * 0.3
                )
        layers.append(layer)
    return layers


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("ranks", [(3, 3, 3), (1, 4, 2)], ids=["equal", "mixed"])
@pytest.mark.parametrize(
    "options",
    [{}, dict(query_before_ln=True), dict(residual_before=True)],
    ids=["merged", "query", "res_before"],
)
def test_eval_fold_matches_reference(activation, ranks, options):
    fast, ref = _pair(ranks, activation, **options)
    g = torch.Generator().manual_seed(2)
    h, x = (torch.randn(3, 4, D, generator=g, dtype=F64) for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(fast(h, x), ref(h, x), rtol=1e-10, atol=1e-10)
        z, rho = torch.randn(5, D, dtype=F64), torch.randn(5, D, dtype=F64)
        qin = torch.randn(5, D, dtype=F64) if options.get("query_before_ln") else None
        torch.testing.assert_close(
            fast.compose(z, rho, qin), ref.compose(z, rho, qin), rtol=1e-10, atol=1e-10
        )
        empty = fast.compose(z[:0], rho[:0], None if qin is None else qin[:0])
    assert fast._folded is not None and empty.shape == (0, D)


def test_eval_fold_strided_inputs_and_no_residual():
    fast, ref = _pair((2, 3), "relu")
    base = torch.randn(4, 3, D, dtype=F64)
    h, x = base.transpose(0, 1), (base * 0.5).transpose(0, 1)  # non-contiguous h + x
    with torch.no_grad():
        torch.testing.assert_close(fast(h, x), ref(h, x), rtol=1e-10, atol=1e-10)
        z = torch.randn(D, 6, dtype=F64).T  # a strided 2-D z, no residual
        torch.testing.assert_close(fast.compose(z), ref.compose(z), rtol=1e-10, atol=1e-10)


def test_eval_fold_follows_settings_changed_after_construction():
    fast, ref = _pair((2, 3), "relu")
    h, x = torch.randn(2, 3, D, dtype=F64), torch.randn(2, 3, D, dtype=F64)
    with torch.no_grad():
        fast(h, x)  # a fold for the first settings
        for layer in (fast, ref):
            layer.residual_before, layer.activation = True, "tanh"
        torch.testing.assert_close(fast(h, x), ref(h, x), rtol=1e-10, atol=1e-10)


def test_eval_fold_with_every_rank_zero():
    """Sources of rank 0 (the fuzz found this): the fold's unit index was an empty float tensor,
    an IndexError; the output is then the bias values' softmax mix, as in the reference."""
    d = 5
    layer = AdapterFusionLayer(
        [torch.randn(0, d, dtype=torch.float64)], [torch.randn(0, dtype=torch.float64)],
        [torch.randn(d, 0, dtype=torch.float64)], [torch.randn(d, dtype=torch.float64)],
        query=False, key=False, value=False, dropout=0.0, backend="torch",
        layer_norm=torch.nn.LayerNorm(d, dtype=torch.float64),
    ).eval()  # fmt: skip
    h, x = torch.randn(3, d, dtype=torch.float64), torch.randn(3, d, dtype=torch.float64)
    with torch.no_grad():
        fast = layer(h, x)
        layer.backend = "reference"
        torch.testing.assert_close(fast, layer(h, x), rtol=1e-12, atol=1e-12)
