"""scaled_adapter_sum: the torch backend against the float64 reference loop (docs/design.md, "Testing rules").

A result passes when ``max|out - ref64| <= 3 * max|ref_same_dtype - ref64| + atol``: the fast
backend may be at most three times as wrong as the reference loop run in the same dtype.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalearn_fast import scaled_adapter_sum
from scalearn_fast.ops import pack_sources, scaled_adapter_sum_packed
from scalearn_fast.ops.composition import Composition

ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make_sources(n, r, d, dtype=torch.float64, seed=0, hetero=None):
    g = torch.Generator().manual_seed(seed)
    ranks = hetero or [r] * n
    wd = [torch.randn(ri, d, generator=g, dtype=dtype) * 0.2 for ri in ranks]
    bd = [torch.randn(ri, generator=g, dtype=dtype) * 0.1 for ri in ranks]
    wu = [torch.randn(d, ri, generator=g, dtype=dtype) * 0.2 for ri in ranks]
    bu = [torch.randn(d, generator=g, dtype=dtype) * 0.1 for _ in ranks]
    if hetero:
        return wd, bd, wu, bu
    return torch.stack(wd), torch.stack(bd), torch.stack(wu), torch.stack(bu)


def cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(dtype).requires_grad_(obj.requires_grad)
    if obj is None:
        return None
    return [cast(o, dtype) for o in obj]


def assert_close_rule(out, ref_low, ref64, dtype, what=""):
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    base = (ref_low.double() - ref64).abs().max().item() if out.numel() else 0.0
    assert err <= 3 * base + ATOL[dtype], f"{what}: err {err:.3e} > 3*{base:.3e} + {ATOL[dtype]:.0e}"


def run_case(backend, dtype, z, sources, omega, residual, activation="relu", row_scale=None):
    """Forward + gradients of a nonlinear loss, for ``backend`` in ``dtype``."""
    wd, bd, wu, bu = (cast(s, dtype) for s in sources)
    zc, om, res = cast(z, dtype), cast(omega, dtype), cast(residual, dtype)
    rs = cast(row_scale, dtype)
    out = scaled_adapter_sum(
        zc, wd, bd, wu, bu, om, res, activation=activation, backend=backend, row_scale=rs
    )
    leaves = [t for t in (zc, om, res, rs) if t is not None and t.requires_grad]
    leaves += [t for s in (wd, bd, wu, bu) for t in (s if isinstance(s, list) else [s]) if t.requires_grad]
    probe = torch.cos(torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape)).to(dtype)
    grads = torch.autograd.grad((out * probe).sum(), leaves, allow_unused=True) if leaves else ()
    return out.detach(), [g.detach() if g is not None else None for g in grads]


def check_against_reference(dtype, z, sources, omega, residual=None, activation="relu", row_scale=None):
    ref64 = run_case("reference", torch.float64, z, sources, omega, residual, activation, row_scale)
    ref_low = run_case("reference", dtype, z, sources, omega, residual, activation, row_scale)
    fast = run_case("torch", dtype, z, sources, omega, residual, activation, row_scale)
    assert fast[0].dtype == dtype
    assert_close_rule(fast[0], ref_low[0], ref64[0], dtype, "out")
    for i, (g, gl, g64) in enumerate(zip(fast[1], ref_low[1], ref64[1], strict=True)):
        assert g.shape == g64.shape
        assert_close_rule(g, gl, g64, dtype, f"grad {i}")


def inputs(shape, n, d, r=6, *, uniform=False, seed=1, grad_sources=False, with_residual=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, d, generator=g, dtype=torch.float64).requires_grad_()
    omega = torch.randn(n, 1 if uniform else d, generator=g, dtype=torch.float64) * 0.5 + 2 / n
    omega.requires_grad_()
    residual = (
        torch.randn(*shape, d, generator=g, dtype=torch.float64).requires_grad_() if with_residual else None
    )
    sources = make_sources(n, r, d, seed=seed)
    if grad_sources:
        sources = tuple(s.requires_grad_() for s in sources)
    return z, sources, omega, residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("uniform", [False, True], ids=["vector", "uniform"])
def test_forward_backward_matches_reference(dtype, uniform):
    z, sources, omega, residual = inputs((3, 11), n=4, d=40, uniform=uniform)
    check_against_reference(dtype, z, sources, omega, residual)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh", "identity"])
def test_activations(activation):
    z, sources, omega, residual = inputs((9,), n=3, d=24)
    check_against_reference(torch.float32, z, sources, omega, residual, activation=activation)


def test_source_gradients_for_joint_training():
    z, sources, omega, residual = inputs((13,), n=3, d=20, grad_sources=True)
    check_against_reference(torch.float32, z, sources, omega, residual)
    check_against_reference(torch.float64, z, sources, omega, residual)


def test_row_scale_per_token_weights():
    z, sources, omega, residual = inputs((2, 5), n=3, d=20, grad_sources=True)
    row_scale = torch.rand(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    check_against_reference(torch.float32, z, sources, omega, residual, row_scale=row_scale.requires_grad_())


@pytest.mark.parametrize("tokens", [0, 1, 7])
def test_awkward_token_counts(tokens):
    z, sources, omega, residual = inputs((tokens,), n=2, d=100)
    check_against_reference(torch.float32, z, sources, omega, residual)


def test_single_source_and_no_residual():
    z, sources, omega, _ = inputs((5,), n=1, d=100, with_residual=False)
    check_against_reference(torch.float32, z, sources, omega, None)


def test_heterogeneous_ranks():
    g = torch.Generator().manual_seed(5)
    sources = make_sources(3, 0, 36, hetero=[3, 8, 5])
    sources = tuple([t.requires_grad_() for t in s] for s in sources)
    z = torch.randn(2, 7, 36, generator=g, dtype=torch.float64).requires_grad_()
    omega = torch.randn(3, 36, generator=g, dtype=torch.float64).requires_grad_()
    check_against_reference(torch.float32, z, sources, omega, None)
    assert pack_sources(*sources).ranks == (3, 8, 5)


def test_non_contiguous_inputs():
    z, sources, omega, residual = inputs((8,), n=3, d=30)
    wd, bd, wu, bu = sources
    z_nc = torch.randn(30, 8, dtype=torch.float64).T  # [8, 30], transposed view
    wd_nc = wd.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    omega_nc = torch.randn(30, 3, dtype=torch.float64).T
    assert not z_nc.is_contiguous() and not wd_nc.is_contiguous() and not omega_nc.is_contiguous()
    out = scaled_adapter_sum(z_nc, wd_nc, bd, wu, bu, omega_nc, backend="torch")
    ref = scaled_adapter_sum(z_nc.contiguous(), wd, bd, wu, bu, omega_nc.contiguous(), backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_nan_propagates_like_the_reference():
    z, sources, omega, _ = inputs((6,), n=2, d=16)
    z = z.detach().clone()
    z[2, 5] = float("nan")
    out = scaled_adapter_sum(z, *sources, omega.detach(), backend="torch")
    ref = scaled_adapter_sum(z, *sources, omega.detach(), backend="reference")
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[2].isnan().all() and not out[[0, 1, 3, 4, 5]].isnan().any()
    z[2, 5] = float("inf")
    assert torch.equal(
        scaled_adapter_sum(z, *sources, omega.detach(), backend="torch").isfinite(),
        scaled_adapter_sum(z, *sources, omega.detach(), backend="reference").isfinite(),
    )


def test_gradcheck_torch_backend_float64():
    z, sources, omega, residual = inputs((2, 3), n=2, d=6, r=3, grad_sources=True)
    row_scale = torch.rand(2, 3, 2, dtype=torch.float64).requires_grad_()

    def fn(z, wd, bd, wu, bu, omega, residual, row_scale):
        return scaled_adapter_sum(
            z, wd, bd, wu, bu, omega, residual, backend="torch", row_scale=row_scale, activation="gelu"
        )

    assert torch.autograd.gradcheck(fn, (z, *sources, omega, residual, row_scale))
    uniform = omega[:, :1].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (z, *sources, uniform, residual, row_scale))


def test_memory_saved_for_backward_is_tokens_by_rank():
    """Only O(T·R) activations are kept, never N [T, d] adapter outputs."""
    t, n, r, d = 256, 8, 4, 64
    z, sources, omega, residual = inputs((t,), n=n, d=d, r=r)
    saved: list[torch.Tensor] = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        scaled_adapter_sum(z, *sources, omega, residual, backend="torch")
    activation_elems = sum(x.numel() for x in saved if x.shape and x.shape[0] == t)
    assert activation_elems <= t * d + t * n * r  # z itself + the [T, R] pre-activation
    assert activation_elems < n * t * d / 4


def test_torch_compile_fullgraph():
    z, sources, omega, residual = inputs((4, 5), n=3, d=16)
    args = [cast(a, torch.float32) for a in (z, *sources, omega, residual)]

    def fn(z, wd, bd, wu, bu, omega, residual):
        return scaled_adapter_sum(z, wd, bd, wu, bu, omega, residual, backend="torch") * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    ref = fn(*args)
    torch.testing.assert_close(out, ref)
    g_c = torch.autograd.grad(out.sum(), [args[0], args[5]])
    g_r = torch.autograd.grad(ref.sum(), [args[0], args[5]])
    for a, b in zip(g_c, g_r, strict=True):
        torch.testing.assert_close(a, b)


def test_custom_op_passes_opcheck():
    z, sources, omega, residual = inputs((5,), n=2, d=8, r=3)
    packed = pack_sources(*sources)
    call = Composition(
        z.detach().float(), packed.w_down.float(), packed.b_down.float(), packed.w_up.float(),
        packed.b_up.float(), packed.source_index, omega.detach().float().requires_grad_(), None, None,
        None, residual.detach().float(), "relu", True,
    )  # fmt: skip
    args = (*call, "torch")
    torch.library.opcheck(torch.ops.scalearn_fast.scaled_adapter_sum.default, args)


def test_op_pre_activation_output_is_not_differentiable():
    """The op's second output (P, saved for backward) is marked non-differentiable."""
    z, sources, omega, residual = inputs((5,), n=2, d=8, r=3)
    packed = pack_sources(*sources)
    call = Composition(
        z, packed.w_down, packed.b_down, packed.w_up, packed.b_up, packed.source_index, omega, None, None,
        None, residual, "relu", True,
    )  # fmt: skip
    out, pre = torch.ops.scalearn_fast.scaled_adapter_sum(*call, "torch")
    assert out.requires_grad and not pre.requires_grad
    out, _ = torch.ops.scalearn_fast.scaled_adapter_sum(*call, "torch")
    out.sum().backward()
    assert omega.grad is not None and z.grad is not None


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    n=st.integers(1, 4),
    r=st.integers(1, 9),
    d=st.integers(1, 33),
    uniform=st.booleans(),
    residual=st.booleans(),
)
def test_shape_fuzz(lead, n, r, d, uniform, residual):
    z, sources, omega, res = inputs(tuple(lead), n=n, d=d, r=r, uniform=uniform, with_residual=residual)
    check_against_reference(torch.float32, z, sources, omega, res)


# ---- bad input: clear ValueErrors that name the argument and the shapes -------------------------


def good(n=3, r=4, d=16, t=5):
    z, sources, omega, residual = inputs((t,), n=n, d=d, r=r)
    return [z.detach(), *sources, omega.detach(), residual.detach()]


@pytest.mark.parametrize(
    "index, bad, pattern",
    [
        (0, torch.randn(5, 17, dtype=torch.float64), r"z has shape \[5, 17\].*d=16"),
        (1, torch.randn(3, 4, dtype=torch.float64), r"w_down"),
        (2, torch.randn(2, 4, dtype=torch.float64), r"b_down has shape \[2, 4\], expected \[3, 4\]"),
        (3, torch.randn(3, 16, 5, dtype=torch.float64), r"w_up has shape \[3, 16, 5\]"),
        (4, torch.randn(4, 16, dtype=torch.float64), r"b_up has shape \[4, 16\].*N=3"),
        (5, torch.randn(2, 16, dtype=torch.float64), r"omega has shape \[2, 16\], expected \[N=3"),
        (5, torch.randn(3, 7, dtype=torch.float64), r"omega has shape \[3, 7\]"),
        (6, torch.randn(5, 15, dtype=torch.float64), r"residual has shape \[5, 15\]"),
        (5, torch.randn(3, 16, dtype=torch.float32), r"omega has dtype torch.float32 but z has dtype"),
        (0, torch.randint(0, 3, (5, 16)), r"z must be a floating-point tensor"),
    ],
)
def test_bad_input_names_argument_and_shape(index, bad, pattern):
    args = good()
    args[index] = bad
    with pytest.raises(ValueError, match=pattern):
        scaled_adapter_sum(*args, backend="torch")


def test_bad_lists_and_options():
    z, wd, bd, wu, bu, omega, _ = good()
    with pytest.raises(ValueError, match="b_down holds 2 sources but w_down holds 3"):
        scaled_adapter_sum(z, list(wd), list(bd)[:2], list(wu), list(bu), omega)
    with pytest.raises(ValueError, match=r"w_up\[1\] has shape"):
        scaled_adapter_sum(z, list(wd), list(bd), [wu[0], wu[1][:, :2], wu[2]], list(bu), omega)
    with pytest.raises(ValueError, match="activation must be one of"):
        scaled_adapter_sum(z, wd, bd, wu, bu, omega, activation="swishy")
    with pytest.raises(ValueError, match="backend must be one of"):
        scaled_adapter_sum(z, wd, bd, wu, bu, omega, backend="cuda")
    with pytest.raises(ValueError, match="N = 0"):
        scaled_adapter_sum(z, [], [], [], [], omega)
    with pytest.raises(ValueError, match="row_scale has shape"):
        scaled_adapter_sum(z, wd, bd, wu, bu, omega, row_scale=torch.rand(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="row_scale must be a tensor .* got list"):
        scaled_adapter_sum(z, wd, bd, wu, bu, omega, row_scale=[[1.0] * 3] * 5)
    n, r = wd.shape[:2]
    for stacked in (True, False):  # d = 0: refused up front, not a reshape error deep inside
        zero = (torch.zeros(n, r, 0), bd, torch.zeros(n, 0, r), torch.zeros(n, 0))
        args = zero if stacked else tuple(list(t) for t in zero)
        with pytest.raises(ValueError, match="the hidden size d must be at least 1"):
            scaled_adapter_sum(z[:, :0], *args, omega[:, :0], backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a device mix")
def test_device_mix_is_rejected():
    z, wd, bd, wu, bu, omega, _ = good()
    with pytest.raises(ValueError, match="omega is on"):
        scaled_adapter_sum(z, wd, bd, wu, bu, omega.cuda())


def test_device_mix_is_rejected_with_meta_tensors():
    z, wd, bd, wu, bu, omega, _ = good()
    with pytest.raises(ValueError, match="omega is on meta but z is on cpu"):
        scaled_adapter_sum(z, wd, bd, wu, bu, omega.to("meta"))


def test_folded_entry_point_checks_its_inputs():
    from scalearn_fast.ops import scaled_adapter_sum_folded
    from scalearn_fast.ops.algebra import scale_up_projections

    z, wd, bd, wu, bu, omega, residual = good()
    packed = pack_sources(wd, bd, wu, bu)
    up, bias = scale_up_projections(packed.w_up, packed.b_up, omega, packed.source_index)
    with torch.no_grad():
        out = scaled_adapter_sum_folded(z, packed, up, bias, residual, backend="torch")
        ref = scaled_adapter_sum(z, wd, bd, wu, bu, omega, residual, backend="reference")
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match=r"folded_up has shape \[16, 11\], expected \[d=16, R=12\]"):
            scaled_adapter_sum_folded(z, packed, up[:, :11], bias, residual, backend="torch")
        with pytest.raises(ValueError, match=r"folded_bias has shape \[15\]"):
            scaled_adapter_sum_folded(z, packed, up, bias[:15], residual, backend="torch")
        with pytest.raises(ValueError, match=r"folded_up has dtype torch.float32"):
            scaled_adapter_sum_folded(z, packed, up.float(), bias, residual, backend="torch")
        with pytest.raises(ValueError, match="folded_bias is on meta but z is on cpu"):
            scaled_adapter_sum_folded(z, packed, up, bias.to("meta"), residual, backend="torch")
        with pytest.raises(ValueError, match="w_down is on meta but z is on cpu"):
            scaled_adapter_sum_folded(z, packed.to(z.dtype, "meta"), up, bias, residual, backend="torch")


def test_packed_entry_point_matches_functional():
    z, sources, omega, residual = inputs((4, 3), n=2, d=12)
    packed = pack_sources(*sources)
    a = scaled_adapter_sum_packed(z, packed, omega, residual, backend="torch")
    b = scaled_adapter_sum(z, *sources, omega, residual, backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("with_row_scale", [False, True])
def test_eager_route_equals_the_custom_op(with_row_scale):
    """Eager calls skip the torch.library dispatch (an autograd.Function around the same backend
    functions); outputs and every gradient must equal the custom op's, bit for bit."""
    from scalearn_fast.ops.dispatch import run

    z, sources, omega, residual = inputs((6,), n=3, d=8, r=2)
    packed = pack_sources(*(s.detach().requires_grad_() for s in sources))
    row_scale = torch.rand(6, 3, dtype=torch.float64, requires_grad=True) if with_row_scale else None
    leaves = [z, packed.w_down, packed.b_down, packed.w_up, packed.b_up, omega, residual]
    if row_scale is not None:
        leaves.append(row_scale)
    call = Composition(z, packed.w_down, packed.b_down, packed.w_up, packed.b_up, packed.source_index,
                       omega, None, None, row_scale, residual, "relu", True)  # fmt: skip
    weight = torch.linspace(-1, 1, 48, dtype=torch.float64).reshape(6, 8)
    results = []
    for route in (
        lambda: run(call, "torch"),
        lambda: torch.ops.scalearn_fast.scaled_adapter_sum(*call, "torch"),
    ):
        out, _ = route()
        results.append((out, *torch.autograd.grad((out * weight).sum(), leaves)))
    for eager, op in zip(*results, strict=True):
        assert torch.equal(eager, op)
    with torch.no_grad():  # the no-grad shortcut: same forward
        assert torch.equal(run(call._replace(save_for_backward=False), "torch")[0], results[0][0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_double_backward_matches_the_reference(backend, activation):
    """A gradient penalty (``create_graph=True``) differentiates through the op on every backend:
    d/dθ of out.sum() + |dout/dz|² equals the loop's, for ω, z and row_scale (it once came back
    as if the penalty were a constant, with no error)."""
    if backend == "triton":
        pytest.importorskip("triton")
    z, sources, omega, residual = inputs((5,), n=3, d=8, r=2)
    row_scale = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for name in (backend, "reference"):
        out = scaled_adapter_sum(
            z, *sources, omega, residual, backend=name, activation=activation, row_scale=row_scale
        )
        (gz,) = torch.autograd.grad(out.sum(), z, create_graph=True)
        assert gz.requires_grad
        loss = out.sum() + gz.pow(2).sum()
        results.append(torch.autograd.grad(loss, (omega, z, row_scale)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
