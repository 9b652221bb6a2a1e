"""The router's fast paths against the float64 oracles: the packed merge's written-out backward
(frozen sources, ``ops/routing_merge.py``, P kept or recomputed), the torch backend's gate
gradient through the relu mask, and the layout helpers it uses (equal and unequal ranks)."""

from __future__ import annotations

import pytest
import torch

from scalearn_fast.ops import algebra, pack_sources, saved_state
from scalearn_fast.ops.routing import merged_adapter_sum, merged_adapter_sum_reference
from scalearn_fast.ops.scaled_adapter_sum import scaled_adapter_sum_packed

F64 = torch.float64


def _packed(n: int, d: int, ranks, seed: int = 0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    ranks = [ranks] * n if isinstance(ranks, int) else list(ranks)
    return pack_sources(
        [torch.randn(r, d, generator=g, dtype=dtype) * 0.4 for r in ranks],
        [torch.randn(r, generator=g, dtype=dtype) * 0.4 for r in ranks],
        [torch.randn(d, r, generator=g, dtype=dtype) * 0.4 for r in ranks],
        [torch.randn(d, generator=g, dtype=dtype) * 0.4 for _ in ranks],
    )


def _leaves(shape, d: int, n: int, seed: int, *, residual: bool = True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, d, dtype=F64, generator=g, requires_grad=True)
    res = torch.randn(*shape, d, dtype=F64, generator=g, requires_grad=True) if residual else None
    logits = torch.randn(*shape, n, dtype=F64, generator=g, requires_grad=True)
    return z, res, logits


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("shape,residual", [((7,), True), ((2, 5), False), ((3, 4), True)])
def test_frozen_merge_matches_oracle(monkeypatch, recompute, activation, shape, residual):
    """Frozen sources take the written-out backward; values and the gradients of z, the
    residual and the router's logits equal the row-by-row oracle's."""
    monkeypatch.setattr(saved_state, "RECOMPUTE_ABOVE", 0.0 if recompute else float("inf"))
    n, d, r = 3, 11, 4
    packed = _packed(n, d, r)
    z, res, logits = _leaves(shape, d, n, seed=5, residual=residual)
    gates = torch.softmax(logits, -1)
    fast = merged_adapter_sum(z, packed, gates, res, activation=activation)
    node = fast.grad_fn
    while type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0"):
        node = node.next_functions[0][0]
    assert type(node).__name__ == "_MergedRowsBackward"  # the written-out backward, not autograd's
    ref = merged_adapter_sum_reference(z, packed, gates, res, activation=activation)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    probe = torch.cos(torch.arange(fast.numel(), dtype=F64)).reshape(fast.shape)
    inputs = [z, logits] + ([res] if residual else [])
    got = torch.autograd.grad((fast * probe).sum(), inputs, retain_graph=True)
    want = torch.autograd.grad((ref * probe).sum(), inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got[1].abs().sum() > 0


def test_frozen_merge_gradcheck_and_double_backward():
    n, d, r = 2, 5, 3
    packed = _packed(n, d, r, seed=1)
    z, res, logits = _leaves((4,), d, n, seed=2)
    gates = torch.softmax(logits, -1).detach().requires_grad_()

    def fn(z, gates, res):
        return merged_adapter_sum(z, packed, gates, res, activation="tanh")

    assert torch.autograd.gradcheck(fn, (z, gates, res))
    assert torch.autograd.gradgradcheck(fn, (z, gates, res))


def test_frozen_merge_empty_rows_and_float32():
    packed = _packed(3, 8, 2, dtype=torch.float32)
    z = torch.zeros(0, 8, requires_grad=True)
    out = merged_adapter_sum(z, packed, torch.zeros(0, 3))
    assert out.shape == (0, 8)
    packed64 = _packed(3, 8, 2)
    z64, _, logits64 = _leaves((6,), 8, 3, seed=3, residual=False)
    ref = merged_adapter_sum_reference(z64, packed64, torch.softmax(logits64, -1))
    z32 = z64.detach().float().requires_grad_()
    got = merged_adapter_sum(z32, packed64.to(torch.float32), torch.softmax(logits64.float(), -1))
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ranks", [4, [2, 5, 3]])
def test_relu_gate_gradient_matches_reference(ranks):
    """Output mode (ω of ones, per-row gates, relu): the gates' gradient read through the relu
    mask equals the reference loop's, for equal ranks (the [T, N, r] views) and unequal ones."""
    n, d = 3, 9
    packed = _packed(n, d, ranks, seed=4)
    z, res, logits = _leaves((2, 5), d, n, seed=6)
    ones = torch.ones(n, 1, dtype=F64)
    outs = [
        scaled_adapter_sum_packed(z, packed, ones, res, backend=b, row_scale=torch.softmax(logits, -1))
        for b in ("torch", "reference")
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    probe = torch.sin(torch.arange(outs[0].numel(), dtype=F64)).reshape(outs[0].shape)
    got, want = (torch.autograd.grad((o * probe).sum(), [z, res, logits], retain_graph=True) for o in outs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_relu_gate_gradient_gradcheck_and_double_backward():
    n, d = 2, 5
    packed = _packed(n, d, 3, seed=8)
    z, res, _ = _leaves((4,), d, n, seed=9)
    scale = torch.rand(4, n, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    omega = (torch.rand(n, d, dtype=F64, generator=torch.Generator().manual_seed(2)) + 0.5).requires_grad_()

    def fn(z, res, scale, omega):
        return scaled_adapter_sum_packed(z, packed, omega, res, backend="torch", row_scale=scale)

    assert torch.autograd.gradcheck(fn, (z, res, scale, omega))
    assert torch.autograd.gradgradcheck(fn, (z, res, scale, omega))


@pytest.mark.parametrize("ranks", [3, [1, 4, 2]])
@pytest.mark.parametrize("uniform", [False, True])
def test_layout_helpers_match_gathers(ranks, uniform):
    n, d, t = 3, 6, 5
    packed = _packed(n, d, ranks, seed=10)
    s, total = packed.source_index, packed.total_rank
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(t, total, dtype=F64, generator=g), torch.randn(t, total, dtype=F64, generator=g)
    w = torch.rand(t, n, dtype=F64, generator=g)
    omega = torch.randn(n, 1 if uniform else d, dtype=F64, generator=g)
    assert algebra.unit_blocks(s, n) == (ranks if isinstance(ranks, int) else None)
    torch.testing.assert_close(algebra.scale_by_source(x, w, s, inplace=False), x * w[:, s])
    gathered = torch.zeros(t, n, dtype=F64).index_add_(1, s, x * y)
    torch.testing.assert_close(algebra.segment_dot(x, y, s, n), gathered)
    torch.testing.assert_close(algebra.segment_sum(x * y, s, n), gathered)
    torch.testing.assert_close(algebra.scale_by_omega(packed.w_up, omega, s), packed.w_up * omega[s].T)
    with torch.inference_mode():  # inference tensors carry no version counter: not cached
        inf_index = s.clone()
        assert algebra.unit_blocks(inf_index, n) == algebra.unit_blocks(s, n)
