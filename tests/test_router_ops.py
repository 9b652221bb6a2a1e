"""Router ops and RouterLayer against float64 loop oracles: gates, masked pooling, the exact
parameter merge (values and gradients), output mode, and the errors."""

from __future__ import annotations

import pytest
import torch

from scalearn_fast.layers_router import RouterLayer
from scalearn_fast.ops.activations import activation_fn
from scalearn_fast.ops.packing import pack_sources
from scalearn_fast.ops.routing import (
    gates,
    masked_mean,
    merged_adapter_sum,
    merged_adapter_sum_per_sequence,
    merged_adapter_sum_reference,
)

F64 = torch.float64


def sources(n: int, d: int, ranks, seed: int = 0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    ranks = [ranks] * n if isinstance(ranks, int) else list(ranks)
    return (
        [torch.randn(r, d, generator=g, dtype=dtype) * 0.4 for r in ranks],
        [torch.randn(r, generator=g, dtype=dtype) * 0.4 for r in ranks],
        [torch.randn(d, r, generator=g, dtype=dtype) * 0.4 for r in ranks],
        [torch.randn(d, generator=g, dtype=dtype) * 0.4 for _ in ranks],
    )


def loop_gates(logits, gate, k=None):
    """The gates written out per row."""
    out = torch.zeros_like(logits)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in logits.shape[:-1]]).reshape(
        -1, logits.dim() - 1
    ):
        row = logits[tuple(idx.tolist())]
        if gate == "softmax":
            val = row.exp() / row.exp().sum()
        elif gate == "sigmoid":
            val = 1 / (1 + (-row).exp())
        else:
            keep = sorted(range(row.numel()), key=lambda i: -row[i].item())[:k]
            val = torch.zeros_like(row)
            e = torch.stack([row[i].exp() for i in keep])
            for j, i in enumerate(keep):
                val[i] = e[j] / e.sum()
        out[tuple(idx.tolist())] = val
    return out


@pytest.mark.parametrize(
    "gate,k", [("softmax", None), ("sigmoid", None), ("topk", 1), ("topk", 2), ("topk", 5)]
)
def test_gates_match_loop(gate, k):
    logits = torch.randn(3, 7, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gates(logits, gate, k), loop_gates(logits, gate, k))
    if gate == "topk":
        assert ((gates(logits, gate, k) > 0).sum(-1) == k).all()


def test_masked_mean_matches_loop():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 6, 4, dtype=F64, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    want = torch.stack([z[b, : int(mask[b].sum())].mean(0) for b in range(3)])
    torch.testing.assert_close(masked_mean(z, mask), want)
    torch.testing.assert_close(masked_mean(z, None), z.mean(1))
    with pytest.raises(ValueError, match=r"attention_mask has shape \[3, 5\], expected \[3, 6\]"):
        masked_mean(z, mask[:, :5])


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 5)])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_merge_equals_merged_adapter_values_and_grads(shape, activation):
    n, d, r = 3, 13, 5
    wd, bd, wu, bu = sources(n, d, r)
    leaves = [t.requires_grad_() for t in (*wd, *bd, *wu, *bu)]
    packed = pack_sources(wd, bd, wu, bu)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(*shape, d, dtype=F64, generator=g, requires_grad=True)
    res = torch.randn(*shape, d, dtype=F64, generator=g, requires_grad=True)
    logits = torch.randn(*shape, n, dtype=F64, generator=g, requires_grad=True)
    gate = torch.softmax(logits, -1)
    fast = merged_adapter_sum(z, packed, gate, res, activation=activation)
    ref = merged_adapter_sum_reference(z, packed, gate, res, activation=activation)
    torch.testing.assert_close(fast, ref)
    # the oracle itself: one adapter with explicitly merged weights, row 0
    g0 = gate.reshape(-1, n)[0]
    m = [sum(g0[i] * w[i] for i in range(n)) for w in (wd, bd, wu, bu)]
    row0 = activation_fn(activation, z.reshape(-1, d)[0] @ m[0].T + m[1]) @ m[2].T + m[3]
    torch.testing.assert_close(ref.reshape(-1, d)[0], row0 + res.reshape(-1, d)[0])
    grad = torch.randn_like(fast)
    inputs = [z, res, logits, *leaves]
    got = torch.autograd.grad(fast, inputs, grad, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert got[2].abs().sum() > 0  # the router gets a gradient


def test_merge_with_one_hot_gates_is_that_adapter():
    n, d, r = 4, 9, 3
    wd, bd, wu, bu = sources(n, d, r)
    packed = pack_sources(wd, bd, wu, bu)
    z = torch.randn(2, 5, d, dtype=F64)
    for k in range(n):
        gate = torch.zeros(2, 5, n, dtype=F64)
        gate[..., k] = 1.0
        want = torch.relu(z @ wd[k].T + bd[k]) @ wu[k].T + bu[k]
        torch.testing.assert_close(merged_adapter_sum(z, packed, gate), want)


def test_merge_errors():
    wd, bd, wu, bu = sources(3, 8, [2, 3, 2])
    packed = pack_sources(wd, bd, wu, bu)
    z = torch.randn(4, 8, dtype=F64)
    with pytest.raises(ValueError, match=r"equal rank.*\[2, 3, 2\]"):
        merged_adapter_sum(z, packed, torch.ones(4, 3, dtype=F64) / 3)
    packed = pack_sources(*sources(3, 8, 2))
    with pytest.raises(ValueError, match=r"gates has shape \[4, 2\], expected \[4, 3\]"):
        merged_adapter_sum(z, packed, torch.ones(4, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"gates has shape \[3\], expected \[4, 3\]"):
        merged_adapter_sum(z, packed, torch.ones(3, dtype=F64))


def _layer_oracle(layer: RouterLayer, z, residual, mask, wd, bd, wu, bu):
    """The layer's composition as loops: logits from the pooled or per-token z, the gates,
    then either Σ_i g_i A_i(z) or the merged adapter."""
    n = layer.num_sources
    w, b = layer.router.weight, layer.router.bias
    if layer.granularity == "sequence":
        pooled = []
        for s in range(z.shape[0]):
            real = [t for t in range(z.shape[1]) if mask is None or mask[s, t]]
            pooled.append(torch.stack([z[s, t] for t in real]).mean(0))
        logits = (torch.stack(pooled) @ w.T + b)[:, None, :].expand(*z.shape[:-1], n)
    else:
        logits = z @ w.T + b
    g = loop_gates(logits, layer.gate, layer.k)
    out = residual.clone()
    for s in range(z.shape[0]):
        for t in range(z.shape[1]):
            gt = g[s, t]
            if layer.mode == "output":
                for i in range(n):
                    out[s, t] = out[s, t] + gt[i] * (torch.relu(z[s, t] @ wd[i].T + bd[i]) @ wu[i].T + bu[i])
            else:
                m = [sum(gt[i] * p[i] for i in range(n)) for p in (wd, bd, wu, bu)]
                out[s, t] = out[s, t] + torch.relu(z[s, t] @ m[0].T + m[1]) @ m[2].T + m[3]
    return out


@pytest.mark.parametrize("mode", ["output", "merge"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("gate,k", [("softmax", None), ("sigmoid", None), ("topk", 2)])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_router_layer_matches_loop_values_and_grads(mode, granularity, gate, k, backend):
    n, d, r = 3, 11, 4
    ranks = r if mode == "merge" else [4, 2, 5]
    wd, bd, wu, bu = sources(n, d, ranks)
    layer = RouterLayer(wd, bd, wu, bu, gate=gate, k=k, granularity=granularity, mode=mode, backend=backend)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(n, d, dtype=F64, generator=g))
        layer.router.bias.copy_(torch.randn(n, dtype=F64, generator=g))
    z = torch.randn(2, 6, d, dtype=F64, generator=g, requires_grad=True)
    res = torch.randn(2, 6, d, dtype=F64, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    out = layer.compose(z, res, attention_mask=mask)
    want = _layer_oracle(layer, z, res, mask, wd, bd, wu, bu)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    params = [z, layer.router.weight, layer.router.bias]
    got = torch.autograd.grad(out, params, grad)
    ref = torch.autograd.grad(want, params, grad)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert got[1].abs().sum() > 0


def test_sequence_router_ignores_padding():
    n, d = 3, 8
    layer = RouterLayer(*sources(n, d, 2), granularity="sequence")
    with torch.no_grad():
        layer.router.weight.normal_()
    z = torch.randn(1, 5, d, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    padded = z.clone()
    padded[0, 3:] = 100.0
    a = layer.coefficients(z, mask)
    b = layer.coefficients(padded, mask)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(layer.coefficients(padded), a)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_output_mode_triton_interpreter(dtype, tol):
    pytest.importorskip("triton")
    n, d = 3, 16
    wd, bd, wu, bu = sources(n, d, 4, dtype=torch.float32)
    ref_layer = RouterLayer(wd, bd, wu, bu, gate="topk", k=2, backend="reference")
    layer = RouterLayer(wd, bd, wu, bu, gate="topk", k=2, backend="triton")
    with torch.no_grad():
        ref_layer.router.weight.normal_()
        layer.router.weight.copy_(ref_layer.router.weight)
    z = torch.randn(2, 5, d)
    out = layer.compose(z.to(dtype))
    torch.testing.assert_close(out.float(), ref_layer.compose(z), rtol=tol, atol=tol)


def test_router_layer_errors():
    srcs = sources(3, 8, 2)
    with pytest.raises(ValueError, match=r"k=4 must be between 1 and the number of sources N=3"):
        RouterLayer(*srcs, gate="topk", k=4)
    with pytest.raises(ValueError, match=r"gate='topk' needs an integer k"):
        RouterLayer(*srcs, gate="topk")
    with pytest.raises(ValueError, match=r"k=2 is only used by gate='topk'"):
        RouterLayer(*srcs, gate="softmax", k=2)
    with pytest.raises(ValueError, match=r"gate must be one of"):
        RouterLayer(*srcs, gate="relu")
    with pytest.raises(ValueError, match=r"granularity must be one of"):
        RouterLayer(*srcs, granularity="batch")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        RouterLayer(*srcs, mode="sum")
    with pytest.raises(ValueError, match=r"merge mode needs sources of equal rank.*\[2, 3\]"):
        RouterLayer(*sources(2, 8, [2, 3]), mode="merge")
    layer = RouterLayer(*srcs)
    z = torch.randn(2, 4, 8, dtype=F64)
    with pytest.raises(ValueError, match=r"gates has shape \[2, 4, 2\], expected \[2, 4, 3\]"):
        layer.compose(z, gates=torch.ones(2, 4, 2, dtype=F64))
    seq = RouterLayer(*srcs, granularity="sequence")
    with pytest.raises(ValueError, match=r"attention_mask has shape \[2, 3\], expected \[2, 4\]"):
        seq.compose(z, attention_mask=torch.ones(2, 3))


@pytest.mark.parametrize("mode", ["output", "merge"])
def test_bf16_close_to_float64(mode):
    n, d, r = 3, 24, 4
    srcs = sources(n, d, r)
    layer = RouterLayer(*srcs, gate="softmax", granularity="sequence", mode=mode, backend="torch")
    with torch.no_grad():
        layer.router.weight.normal_()
    z = torch.randn(2, 6, d, dtype=F64)
    want = layer.compose(z)
    got = layer.compose(z.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("mode", ["output", "merge"])
def test_torch_compile_fullgraph(mode):
    n, d = 3, 16
    layer = RouterLayer(
        *sources(n, d, 4, dtype=torch.float32),
        gate="topk",
        k=2,
        granularity="sequence",
        mode=mode,
        backend="torch",
    )
    with torch.no_grad():
        layer.router.weight.normal_()
    z = torch.randn(2, 5, d, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    compiled = torch.compile(
        lambda z, m: layer.compose(z, attention_mask=m), fullgraph=True, backend="aot_eager"
    )
    out, ref = compiled(z, mask), layer.compose(z, attention_mask=mask)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out.sum(), [z, layer.router.weight])
    want = torch.autograd.grad(ref.sum(), [z, layer.router.weight])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_per_sequence_merge_matches_oracle_values_and_grads(activation):
    n, d, r = 3, 10, 3
    wd, bd, wu, bu = sources(n, d, r)
    leaves = [t.requires_grad_() for t in (*wd, *bd, *wu, *bu)]
    packed = pack_sources(wd, bd, wu, bu)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 5, d, dtype=F64, generator=g, requires_grad=True)
    res = torch.randn(3, 5, d, dtype=F64, generator=g)
    logits = torch.randn(3, n, dtype=F64, generator=g, requires_grad=True)
    seq_gates = torch.softmax(logits, -1)
    fast = merged_adapter_sum_per_sequence(z, packed, seq_gates, res, activation=activation)
    ref = merged_adapter_sum_reference(
        z, packed, seq_gates[:, None, :].expand(3, 5, n), res, activation=activation
    )
    torch.testing.assert_close(fast, ref)
    grad = torch.randn_like(fast)
    inputs = [z, logits, *leaves]
    for a, b in zip(
        torch.autograd.grad(fast, inputs, grad, retain_graph=True),
        torch.autograd.grad(ref, inputs, grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"gates has shape \[3, 2\], expected \[3, 3\]"):
        merged_adapter_sum_per_sequence(z, packed, seq_gates[:, :2])
    with pytest.raises(ValueError, match=r"equal rank"):
        merged_adapter_sum_per_sequence(z, pack_sources(*sources(3, d, [3, 2, 3])), seq_gates)
