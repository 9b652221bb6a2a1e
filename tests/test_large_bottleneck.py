"""Large bottlenecks (R = N·r past d): the backward recomputes P = z·Dᵀ + b_D instead of keeping
it (ops/saved_state.py). Values and gradients against the float64 loop, what the call keeps
for its backward, the rule's threshold, and the Triton backend past the fused kernel's R limit
(under the interpreter at small sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from scalearn_fast import scaled_adapter_sum
from scalearn_fast.ops import pack_sources, saved_state
from scalearn_fast.ops.composition import Composition


def _inputs(t: int, n: int, r: int, d: int, *, uniform: bool = False, row_scale: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    z = rnd(t, d, std=1.0)
    sources = [rnd(n, r, d), rnd(n, r, std=0.1), rnd(n, d, r), rnd(n, d, std=0.1)]
    omega = rnd(n, 1 if uniform else d, std=0.5) + 2 / n
    residual = rnd(t, d, std=1.0)
    scale = torch.rand(t, n, generator=g, dtype=torch.float64) if row_scale else None
    return z, sources, omega, residual, scale


def _run(backend: str, dtype: torch.dtype, inputs, *, grad_sources: bool):
    def cast(x):
        return None if x is None else [s.to(dtype) for s in x] if isinstance(x, list) else x.to(dtype)

    z, sources, omega, residual, scale = (cast(x) for x in inputs)
    leaves = [z, omega, residual] + ([scale] if scale is not None else []) + (sources if grad_sources else [])
    for leaf in leaves:
        leaf.requires_grad_(True)
    out = scaled_adapter_sum(z, *sources, omega, residual, backend=backend, row_scale=scale)
    probe = torch.cos(torch.arange(out.numel(), dtype=dtype)).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad((out * probe).sum(), leaves)]


def _check(got, low, ref64, atol: float) -> None:
    """The suite's rule: |got - ref64| <= 3·|reference loop in got's dtype - ref64| + atol."""
    for i, (a, b, c) in enumerate(zip(got, low, ref64, strict=True)):
        err = (a.double() - c).abs().max().item()
        base = (b.double() - c).abs().max().item()
        assert err <= 3 * base + atol, f"tensor {i}: err {err:.3e} > 3*{base:.3e} + {atol:.0e}"


def test_the_rule_recomputes_past_the_hidden_size(monkeypatch):
    assert not saved_state.recompute_pre(768, 768) and saved_state.recompute_pre(769, 768)
    assert saved_state.recompute_pre(8 * 1024, 1024)  # N = 8, r = 1024, d = 1024
    assert not saved_state.recompute_pre(8 * 48, 768)  # the default shape keeps P
    monkeypatch.setattr(saved_state, "RECOMPUTE_ABOVE", math.inf)
    assert not saved_state.recompute_pre(10**6, 16)


@pytest.mark.parametrize("uniform", [False, True], ids=["vector", "uniform"])
@pytest.mark.parametrize("row_scale", [False, True], ids=["", "row_scale"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recompute_path_matches_the_float64_loop(uniform, row_scale, dtype):
    inputs = _inputs(9, n=4, r=12, d=16, uniform=uniform, row_scale=row_scale)  # R = 48 > d: recomputed
    assert saved_state.recompute_pre(48, 16)
    ref64 = _run("reference", torch.float64, inputs, grad_sources=True)
    low = _run("reference", dtype, inputs, grad_sources=True)
    got = _run("torch", dtype, inputs, grad_sources=True)
    _check(got, low, ref64, 1e-12 if dtype == torch.float64 else 1e-5)


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return shapes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_recompute_keeps_no_tokens_by_units_tensor(backend, monkeypatch):
    """Under the recompute rule nothing of shape [T, R] is kept for backward; with the rule off
    P [T, R] is (the check can fail)."""
    if backend == "triton":
        pytest.importorskip("triton")
    t, n, r, d = 12, 3, 8, 16
    z, sources, omega, residual, _ = _inputs(t, n, r, d)
    z, omega = z.float().requires_grad_(), omega.float().requires_grad_()
    sources, residual = [s.float() for s in sources], residual.float()

    def call():
        return scaled_adapter_sum(z, *sources, omega, residual, backend=backend)

    assert saved_state.recompute_pre(n * r, d)
    kept = _saved_shapes(call)
    assert (t, n * r) not in kept and (t, d) in kept, kept  # z is kept, P is not
    assert sum(math.prod(s) for s in kept if s and s[0] == t) <= t * d
    monkeypatch.setattr(saved_state, "RECOMPUTE_ABOVE", math.inf)
    assert (t, n * r) in _saved_shapes(call)


def test_recompute_equals_keeping_p_bit_for_bit(monkeypatch):
    """The recomputed P is the forward's P: on the torch backend both routes give the same bits."""
    inputs = _inputs(7, n=2, r=5, d=8, row_scale=True)
    monkeypatch.setattr(saved_state, "RECOMPUTE_ABOVE", 0.0)
    recomputed = _run("torch", torch.float32, inputs, grad_sources=True)
    monkeypatch.setattr(saved_state, "RECOMPUTE_ABOVE", math.inf)
    kept = _run("torch", torch.float32, inputs, grad_sources=True)
    for a, b in zip(recomputed, kept, strict=True):
        assert torch.equal(a, b)


def test_custom_op_with_recompute_passes_opcheck():
    """The op's fake gives an empty pre when the call recomputes it, as the real op does."""
    z, sources, omega, residual, _ = _inputs(5, n=3, r=4, d=8)
    packed = pack_sources(*(s.float() for s in sources))
    call = Composition(
        z.float(), packed.w_down, packed.b_down, packed.w_up, packed.b_up, packed.source_index,
        omega.float().requires_grad_(), None, None, None, residual.float(), "relu", True, recompute_pre=True,
    )  # fmt: skip
    out, pre = torch.ops.scalearn_fast.scaled_adapter_sum(*call, "torch")
    assert pre.numel() == 0 and out.shape == z.shape
    op = torch.ops.scalearn_fast.scaled_adapter_sum.default
    torch.library.opcheck(op, (*call, "torch"), test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_with_recompute(monkeypatch):
    monkeypatch.setattr(saved_state, "RECOMPUTE_ABOVE", 0.0)
    z, sources, omega, residual, _ = _inputs(6, n=2, r=4, d=8)
    args = [a.float() for a in (z, *sources, omega, residual)]
    args[0].requires_grad_(), args[5].requires_grad_()

    def fn(z, wd, bd, wu, bu, omega, residual):
        return scaled_adapter_sum(z, wd, bd, wu, bu, omega, residual, backend="torch") * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, ref = compiled(*args), fn(*args)
    torch.testing.assert_close(out, ref)
    for a, b in zip(
        torch.autograd.grad(out.sum(), [args[0], args[5]]),
        torch.autograd.grad(ref.sum(), [args[0], args[5]]),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_triton_past_the_fused_limit_matches_the_float64_loop():
    """R = 640 > the fused kernel's 512: the Triton backend runs its two-kernel forward (R tiled,
    no limit) and its backward kernels on the recomputed P; fp32 under the interpreter."""
    pytest.importorskip("triton")
    from scalearn_fast._kernels import load_kernels

    n, r, d = 5, 128, 16
    assert not load_kernels().fused_fits(n * r, torch.float16) and saved_state.recompute_pre(n * r, d)
    inputs = _inputs(7, n=n, r=r, d=d, row_scale=True, seed=3)
    ref64 = _run("reference", torch.float64, inputs, grad_sources=False)
    low = _run("reference", torch.float32, inputs, grad_sources=False)
    got = _run("triton", torch.float32, inputs, grad_sources=False)
    _check(got, low, ref64, 1e-5)


@pytest.mark.parametrize("uniform", [False, True], ids=["vector", "uniform"])
def test_task_bank_with_recompute_matches_the_float64_loop(uniform, monkeypatch):
    """A task bank's backward (vector: a loop over sources; uniform: a row_scale) on recomputed P."""
    from scalearn_fast.ops import scaled_adapter_sum_bank

    monkeypatch.setattr(saved_state, "RECOMPUTE_ABOVE", 0.0)
    z, sources, _, residual, _ = _inputs(8, n=3, r=4, d=8, seed=5)
    g = torch.Generator().manual_seed(6)
    bank = torch.randn(2, 3, 1 if uniform else 8, generator=g, dtype=torch.float64)
    tasks = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    results = []
    for backend in ("torch", "reference"):
        zz, bb = z.clone().requires_grad_(), bank.clone().requires_grad_()
        out = scaled_adapter_sum_bank(zz, *sources, bb, tasks, residual, backend=backend)
        results.append((out, *torch.autograd.grad(out.sin().sum(), (zz, bb))))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
