"""The LoRA-mixture op (shared and per-expert down matrix) against the float64 per-expert loop:
values and gradients at awkward shapes, the top-k gates and balance loss, what the op keeps for
its backward, and its errors."""

from __future__ import annotations

import pytest
import torch

from scalearn_fast.ops.lora_mixture import lora_mixture
from scalearn_fast.ops.lora_mixture_gates import balance_loss, topk_gates
from scalearn_fast.ops.lora_mixture_reference import lora_mixture_reference
from scalearn_fast.ops.lora_mixture_torch import lora_mixture_expand, lora_mixture_expand_backward

# (T, N, r, d_in, d_out): one token, rank 1, one expert, d_out != d_in both ways
SHAPES = [(1, 3, 2, 5, 4), (7, 1, 3, 4, 6), (6, 4, 1, 3, 3), (9, 5, 3, 8, 2), (2, 2, 4, 3, 9)]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _inputs(t, n, r, d_in, d_out, shared, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d_in, generator=gen, dtype=torch.float64)
    a = torch.randn(r if shared else n * r, d_in, generator=gen, dtype=torch.float64)
    b = torch.randn(n, d_out, r, generator=gen, dtype=torch.float64)
    g, _, _ = topk_gates(torch.randn(t, n, generator=gen, dtype=torch.float64), min(2, n))
    return [v.to(dtype).requires_grad_(True) for v in (x, a, b, g)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}-N{s[1]}-r{s[2]}-{s[3]}to{s[4]}" for s in SHAPES])
def test_op_matches_float64_loop(shape, shared, dtype):
    x, a, b, g = _inputs(*shape, shared, dtype)
    out = lora_mixture(x, a, b, g, 1.5)
    ref_in = [v.detach().double().requires_grad_(True) for v in (x, a, b, g)]
    ref = lora_mixture_reference(*ref_in[:3], ref_in[3], 1.5)
    assert out.dtype == dtype and out.shape == (shape[0], shape[4])
    tol = TOL[dtype]
    scale = ref.abs().max().item() + 1.0
    assert (out.double() - ref).abs().max().item() <= tol * scale
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (x, a, b, g), grad_out.to(dtype))
    refs = torch.autograd.grad(ref, ref_in, grad_out)
    for name, got, want in zip(("x", "a_down", "b_up", "gates"), grads, refs, strict=True):
        err = (got.double() - want).abs().max().item()
        assert err <= tol * (want.abs().max().item() + 1.0), f"d{name}: {err}"


def test_leading_dims_and_reference_backend():
    x, a, b, g = _inputs(6, 3, 2, 5, 4, True, torch.float64)
    x3, g3 = x.detach().view(2, 3, 5), g.detach().view(2, 3, 3)
    out = lora_mixture(x3, a.detach(), b.detach(), g3, 2.0)
    ref = lora_mixture(x3, a.detach(), b.detach(), g3, 2.0, backend="reference")
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_zero_tokens():
    x, a, b, g = _inputs(3, 3, 2, 5, 4, True, torch.float32)
    out = lora_mixture(x[:0], a, b, g[:0], 2.0)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert a.grad is not None and torch.all(a.grad == 0)


def test_expand_functions_follow_the_interface():
    """The expand pair on its own (the seam the Triton kernels plug into): per expert and shared."""
    gen = torch.Generator().manual_seed(3)
    t, n, r, d_out = 5, 3, 2, 4
    b = torch.randn(n, d_out, r, generator=gen, dtype=torch.float64)
    g = torch.rand(t, n, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(t, d_out, generator=gen, dtype=torch.float64)
    for shared in (True, False):
        p = torch.randn(t, r if shared else n * r, generator=gen, dtype=torch.float64, requires_grad=True)
        pn = [p if shared else p[:, i * r : (i + 1) * r] for i in range(n)]
        want = 0.5 * sum(g[:, i : i + 1] * (pn[i] @ b[i].T) for i in range(n))
        out = lora_mixture_expand(p.detach(), g, b, 0.5, shared=shared)
        torch.testing.assert_close(out, want)
        dp, dg, db = lora_mixture_expand_backward(
            p.detach(), g, b, grad_out, 0.5, shared=shared, needs=(True, True, False)
        )
        assert db is None
        (want_dp,) = torch.autograd.grad(want, p, grad_out)
        torch.testing.assert_close(dp, want_dp)
        want_dg = torch.stack([0.5 * ((grad_out @ b[i]) * pn[i]).sum(-1) for i in range(n)], -1)
        torch.testing.assert_close(dg, want_dg.detach())


def _saved_elements(fn) -> list[tuple[int, ...]]:
    """Shapes of what autograd keeps after ``fn()``, beyond its inputs."""
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
def test_backward_keeps_no_T_by_N_r_tensor(shared):
    t, n, r, d = 16, 4, 3, 8
    x, a, b, g = _inputs(t, n, r, d, d, shared, torch.float32)
    shapes = _saved_elements(lambda: lora_mixture(x, a, b, g, 1.0))
    assert (t, n * r) not in shapes
    new = [s for s in shapes if s not in {tuple(v.shape) for v in (x, a, b, g)} and s != (0,)]
    assert new == ([(t, r)] if shared else []), new  # shared: only P [T, r]; no [N, T, d] either


def test_topk_gates_and_balance_loss():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
    gates, probs, chosen = topk_gates(logits, 2)
    assert torch.equal(chosen, torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float64))
    torch.testing.assert_close(gates[0, :2], torch.softmax(logits[0, :2], -1))
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    f = chosen.mean(0) / 2
    torch.testing.assert_close(balance_loss(probs, chosen, 2), 4 * (f * probs.mean(0)).sum())
    uniform = torch.full((3, 4), 0.25, dtype=torch.float64)
    assert balance_loss(uniform, torch.ones(3, 4, dtype=torch.float64), 4).item() == pytest.approx(1.0)
    full, _, _ = topk_gates(logits, 4)
    torch.testing.assert_close(full, torch.softmax(logits, -1))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, a, b, g: (x[:, :-1], a, b, g), "x has shape"),
        (lambda x, a, b, g: (x, a[:, :-1], b, g), "x has shape"),
        (lambda x, a, b, g: (x, torch.cat([a, a]), b, g), "a_down has shape"),
        (lambda x, a, b, g: (x, a, b[0], g), "b_up must be"),
        (lambda x, a, b, g: (x, a, b, g[:, :-1]), "gates has shape"),
        (lambda x, a, b, g: (x, a, b.double(), g), "b_up .* must match x"),
        (lambda x, a, b, g: (x, a, b, g.long()), "gates must be a floating-point"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    x, a, b, g = (v.detach() for v in _inputs(4, 3, 2, 5, 4, True, torch.float32))
    with pytest.raises(ValueError, match=match):
        lora_mixture(*change(x, a, b, g), 1.0)
    with pytest.raises(ValueError, match="top_k"):
        topk_gates(g, 4)
    with pytest.raises(ValueError, match="backend"):
        lora_mixture(x, a, b, g, 1.0, backend="cuda")


def test_custom_op_passes_opcheck():
    x, a, b, g = (v.detach().requires_grad_(True) for v in _inputs(5, 3, 2, 4, 6, True, torch.float32))
    op = torch.ops.scalearn_fast.lora_mixture.default
    torch.library.opcheck(op, (x, a, g, b, 1.5, True, True, "torch"))
    x, a, b, g = (v.detach().requires_grad_(True) for v in _inputs(5, 3, 2, 4, 6, False, torch.float32))
    torch.library.opcheck(op, (x, a, g, b, 1.5, False, False, "torch"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_close_to_float64(dtype):
    x, a, b, g = _inputs(8, 4, 3, 16, 12, True, dtype)
    out = lora_mixture(x, a, b, g, 2.0)
    ref = lora_mixture_reference(*(v.detach().double() for v in (x, a, b, g)), 2.0)
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max().item() <= 3e-2 * (ref.abs().max().item() + 1.0)
    out.float().sum().backward()
    assert all(v.grad is not None and v.grad.dtype == dtype for v in (x, a, b, g))


def test_layer_backends_agree():
    from scalearn_fast.layers_lora_mixture import LoRAMixture

    torch.manual_seed(0)
    fused = LoRAMixture(6, 5, num_experts=3, rank=2, alpha=4, dtype=torch.float64).eval()
    with torch.no_grad():
        fused.b_up.normal_()
    loop = LoRAMixture(6, 5, num_experts=3, rank=2, alpha=4, dtype=torch.float64, backend="reference").eval()
    loop.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(fused(x), loop(x), rtol=1e-12, atol=1e-12)


def test_per_sequence_gates_by_expanding():
    """One gate vector per sequence, ``[B, N]`` expanded over the tokens: values and the gates'
    gradient (summed over each sequence's tokens) as the loop gives them."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 7, 3, generator=gen, dtype=torch.float64)
    seq_gates = torch.rand(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    per_token = seq_gates[:, None, :].expand(2, 5, 4)
    out = lora_mixture(x, a, b, per_token, 0.5)
    ref = lora_mixture_reference(x, a, b, per_token, 0.5)
    torch.testing.assert_close(out, ref)
    (got,) = torch.autograd.grad(out.square().sum(), seq_gates)
    (want,) = torch.autograd.grad(ref.square().sum(), seq_gates)
    torch.testing.assert_close(got, want)
