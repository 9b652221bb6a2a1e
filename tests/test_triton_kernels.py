"""scaled_adapter_sum's Triton backend (docs/design.md, "Testing rules"): the whole op against the float64
reference loop, plus each launcher against its plain-PyTorch ``*_ref``.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with one small autotune
config, so shapes stay small. A result passes when
``max|out - ref64| <= 3 * max|ref_same_dtype - ref64| + atol``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from scalearn_fast import scaled_adapter_sum  # noqa: E402
from scalearn_fast._kernels import load_kernels  # noqa: E402
from scalearn_fast.ops import pack_sources, scaled_adapter_sum_folded, triton_backend  # noqa: E402
from scalearn_fast.ops.algebra import scale_up_projections as fold_omega  # noqa: E402
from scalearn_fast.ops.composition import Composition, Gradients  # noqa: E402

K = load_kernels()
KF = K.scaled_adapter_sum  # the module, for monkeypatching FUSED_MAX_R
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(params=["fused", "two_kernel"])
def path(request, monkeypatch):
    """Run a test through the fused kernel and through down_projection + up_projection."""
    monkeypatch.setattr(triton_backend, "USE_FUSED", request.param == "fused")
    return request.param


def make_sources(n, r, d, *, seed=0, hetero=None, grad=False):
    g = torch.Generator().manual_seed(seed)
    ranks = hetero or [r] * n
    wd = [torch.randn(ri, d, generator=g, dtype=torch.float64) * 0.2 for ri in ranks]
    bd = [torch.randn(ri, generator=g, dtype=torch.float64) * 0.1 for ri in ranks]
    wu = [torch.randn(d, ri, generator=g, dtype=torch.float64) * 0.2 for ri in ranks]
    bu = [torch.randn(d, generator=g, dtype=torch.float64) * 0.1 for _ in ranks]
    srcs = (wd, bd, wu, bu) if hetero else tuple(torch.stack(s) for s in (wd, bd, wu, bu))
    if grad:
        srcs = tuple([t.requires_grad_() for t in s] if hetero else s.requires_grad_() for s in srcs)
    return srcs


def make_inputs(shape, n, d, r=6, *, uniform=False, seed=1, residual=True, row_scale=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, d, generator=g, dtype=torch.float64).requires_grad_()
    omega = (
        torch.randn(n, 1 if uniform else d, generator=g, dtype=torch.float64) * 0.5 + 2 / n
    ).requires_grad_()
    res = torch.randn(*shape, d, generator=g, dtype=torch.float64).requires_grad_() if residual else None
    rs = torch.rand(*shape, n, generator=g, dtype=torch.float64).requires_grad_() if row_scale else None
    return z, omega, res, rs


def cast(obj, dtype, device=DEVICE):
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device=device, dtype=dtype).requires_grad_(obj.requires_grad)
    return [cast(o, dtype, device) for o in obj]


def assert_close_rule(out, ref_low, ref64, dtype, what=""):
    assert out.shape == ref64.shape, what
    if not out.numel():
        return
    err = (out.double().cpu() - ref64).abs().max().item()
    base = (ref_low.double().cpu() - ref64).abs().max().item()
    assert err <= 3 * base + ATOL[dtype], f"{what}: err {err:.3e} > 3*{base:.3e} + {ATOL[dtype]:.0e}"


def run_case(backend, dtype, z, sources, omega, residual, activation, row_scale, device):
    wd, bd, wu, bu = (cast(s, dtype, device) for s in sources)
    zc, om, res, rs = (cast(t, dtype, device) for t in (z, omega, residual, row_scale))
    out = scaled_adapter_sum(
        zc, wd, bd, wu, bu, om, res, activation=activation, backend=backend, row_scale=rs
    )
    leaves = [t for t in (zc, om, res, rs) if t is not None and t.requires_grad]
    leaves += [t for s in (wd, bd, wu, bu) for t in (s if isinstance(s, list) else [s]) if t.requires_grad]
    probe = torch.cos(torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape)).to(out)
    grads = torch.autograd.grad((out * probe).sum(), leaves, allow_unused=True) if leaves else ()
    return out.detach(), [None if g is None else g.detach() for g in grads]


def check(dtype, z, sources, omega, residual=None, activation="relu", row_scale=None, device=DEVICE):
    """Forward and every gradient of the triton backend against the float64 reference loop."""
    args = (z, sources, omega, residual, activation, row_scale)
    ref64 = run_case("reference", torch.float64, *args, "cpu")
    ref_low = run_case("reference", dtype, *args, "cpu")
    fast = run_case("triton", dtype, *args, device)
    assert fast[0].dtype == dtype
    assert_close_rule(fast[0], ref_low[0], ref64[0], dtype, "out")
    assert len(fast[1]) == len(ref64[1])
    for i, (g, gl, g64) in enumerate(zip(fast[1], ref_low[1], ref64[1], strict=True)):
        assert (g is None) == (g64 is None), f"grad {i}"
        if g is not None:
            assert_close_rule(g, gl, g64, dtype, f"grad {i}")


# ----------------------------------------------------------------------------- the whole op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("uniform", [False, True], ids=["vector", "uniform"])
def test_matches_reference_3d_input(path, dtype, uniform):
    z, omega, res, _ = make_inputs((3, 11), n=3, d=40, uniform=uniform)
    check(dtype, z, make_sources(3, 6, 40, grad=True), omega, res)


@pytest.mark.parametrize("tokens", [0, 1, 7, 33])
def test_token_counts(path, tokens):
    z, omega, res, _ = make_inputs((tokens,), n=3, d=100)
    check(torch.float32, z, make_sources(3, 5, 100), omega, res)


def test_single_source_no_residual(path):
    z, omega, _, _ = make_inputs((7,), n=1, d=100, residual=False)
    check(torch.float32, z, make_sources(1, 8, 100, grad=True), omega)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_heterogeneous_ranks(path, dtype):
    z, omega, res, _ = make_inputs((2, 7), n=3, d=40)
    check(dtype, z, make_sources(3, 0, 40, hetero=[3, 8, 5], grad=True), omega, res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_scale(path, dtype):
    z, omega, res, rs = make_inputs((2, 5), n=3, d=40, row_scale=True)
    check(dtype, z, make_sources(3, 0, 40, hetero=[3, 8, 5], grad=True), omega, res, row_scale=rs)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh", "identity"])
def test_activations(activation):
    z, omega, res, rs = make_inputs((9,), n=3, d=24, row_scale=True)
    check(torch.float32, z, make_sources(3, 4, 24, grad=True), omega, res, activation, row_scale=rs)


def test_fused_threshold_routes_large_rank_to_two_kernels(monkeypatch):
    """With FUSED_MAX_R below next_pow2(R) the backend falls back to the two-kernel path."""
    monkeypatch.setattr(KF, "FUSED_MAX_R", 16)
    monkeypatch.setattr(KF, "FUSED_MAX_R_FP32", 16)
    assert not K.fused_fits(24) and K.fused_fits(16)
    assert not K.fused_fits(24, torch.float32) and K.fused_fits(16, torch.float32)
    z, omega, res, _ = make_inputs((7,), n=3, d=40)
    check(torch.float32, z, make_sources(3, 8, 40), omega, res)


def test_fused_config_pruning_keeps_wgmma_sized_row_tiles():
    """At R_PAD = 512 the fused kernel may use 64-row tiles (Hopper wgmma's smallest) at 8 warps;
    larger S blocks per thread are pruned, and pruning never leaves nothing."""
    import triton

    def cfg(block_t, warps):
        tiles = {"BLOCK_T": block_t, "BLOCK_D": 64, "BLOCK_K": 64}
        return triton.Config(tiles, num_warps=warps, num_stages=2)

    configs = [cfg(128, 8), cfg(64, 8), cfg(64, 4), cfg(32, 4), cfg(16, 8)]
    kept = KF._prune_fused(configs, {}, R_PAD=512)
    assert [(c.kwargs["BLOCK_T"], c.num_warps) for c in kept] == [(64, 8), (32, 4), (16, 8)]
    kept = KF._prune_fused(configs, {}, R_PAD=128)
    assert len(kept) == len(configs)
    only = KF._prune_fused([cfg(128, 4), cfg(64, 4)], {}, R_PAD=4096)
    assert [c.kwargs["BLOCK_T"] for c in only] == [64]


def test_fp32_fused_cap_routes_to_two_kernels(monkeypatch):
    """fp32 operands use the fused kernel only up to FUSED_MAX_R_FP32 (its shared memory at
    R_PAD 256-512 exceeds an H100 block's); 2-byte dtypes keep FUSED_MAX_R."""
    assert K.fused_fits(384) and K.fused_fits(384, torch.float16) and K.fused_fits(384, torch.bfloat16)
    assert not K.fused_fits(384, torch.float32) and K.fused_fits(K.FUSED_MAX_R_FP32, torch.float32)
    assert not K.fused_fits(K.FUSED_MAX_R_FP32 + 1, torch.float32)

    def no_fused(*args, **kwargs):
        raise AssertionError("fp32 with next_pow2(R) > FUSED_MAX_R_FP32 must take the two-kernel path")

    monkeypatch.setattr(K, "fused_forward", no_fused)
    z, omega, res, _ = make_inputs((5,), n=3, d=24)
    check(torch.float32, z, make_sources(3, 0, 24, hetero=[30, 20, 22]), omega, res)


@pytest.mark.parametrize("faster", ["fused", "two_kernel"])
def test_measured_path_choice_runs_the_faster_path_and_caches_it(monkeypatch, faster):
    """USE_FUSED=None (default): where it can measure (CUDA, autotune on), the backend times both
    forward paths once per shape class (T bucketed to powers of two) and keeps the faster one."""
    from scalearn_fast.ops import path_choice

    monkeypatch.setattr(triton_backend, "USE_FUSED", None)
    monkeypatch.setattr(path_choice, "_can_measure", lambda z: True)
    monkeypatch.setattr(path_choice, "_CHOICES", {})
    timed, ran = [], []

    def fake_time(fn):
        timed.append(fn.__name__)
        fn()  # both candidates must run
        return 1.0 if fn.__name__ == faster else 2.0

    monkeypatch.setattr(path_choice, "_time_ms", fake_time)

    def spy(name, real):
        def launcher(*args, **kwargs):
            ran.append(name)
            return real(*args, **kwargs)

        return launcher

    for name in ("fused_forward", "down_projection"):
        monkeypatch.setattr(K, name, spy(name, getattr(K, name)))
    for tokens in (5, 7, 8):  # one class: next_pow2 = 8
        z, omega, res, _ = make_inputs((tokens,), n=3, d=24)
        check(torch.float16, z, make_sources(3, 4, 24), omega, res)
    assert timed == ["fused", "two_kernel"]  # measured once for the class, then cached
    expect = "fused_forward" if faster == "fused" else "down_projection"
    assert ran[2:] == [expect] * (len(ran) - 2)  # after the two timed runs, only the winner
    z, omega, res, _ = make_inputs((9,), n=3, d=24)  # next bucket (16): measured again
    check(torch.float16, z, make_sources(3, 4, 24), omega, res)
    assert timed == ["fused", "two_kernel"] * 2
    assert set(path_choice.choices().values()) == {faster}


def test_forced_path_is_not_measured(monkeypatch):
    from scalearn_fast.ops import path_choice

    monkeypatch.setattr(path_choice, "_can_measure", lambda z: True)
    monkeypatch.setattr(path_choice, "_time_ms", lambda fn: pytest.fail("a forced path must not be timed"))
    monkeypatch.setattr(triton_backend, "USE_FUSED", False)
    monkeypatch.setattr(K, "fused_forward", lambda *a, **k: pytest.fail("USE_FUSED=False never fuses"))
    z, omega, res, _ = make_inputs((6,), n=2, d=16)
    check(torch.float16, z, make_sources(2, 4, 16), omega, res)


def test_folded_inference_path(path):
    z, omega, res, _ = make_inputs((2, 7), n=3, d=100)
    packed = pack_sources(*make_sources(3, 0, 100, hetero=[3, 8, 5]))
    u, bias = fold_omega(packed.w_up, packed.b_up, omega.detach(), packed.source_index)
    ref = scaled_adapter_sum_folded(z.detach(), packed, u, bias, res.detach(), backend="torch")
    for dtype in (torch.float32, torch.float16):
        with torch.no_grad():
            out = scaled_adapter_sum_folded(
                cast(z, dtype),
                packed.to(dtype, DEVICE),
                cast(u, dtype),
                cast(bias, dtype),
                cast(res, dtype),
                backend="triton",
            )
            low = scaled_adapter_sum_folded(
                cast(z, dtype, "cpu"),
                packed.to(dtype),
                cast(u, dtype, "cpu"),
                cast(bias, dtype, "cpu"),
                cast(res, dtype, "cpu"),
                backend="torch",
            )
        assert out.dtype == dtype
        assert_close_rule(out, low, ref, dtype, f"folded {dtype}")


def test_nan_propagates_like_the_reference(path):
    z, omega, _, _ = make_inputs((6,), n=2, d=40)
    z = z.detach().clone()
    z[2, 5] = float("nan")
    sources = make_sources(2, 6, 40)
    out = scaled_adapter_sum(
        cast(z, torch.float32),
        *cast(sources, torch.float32),
        cast(omega, torch.float32).detach(),
        backend="triton",
    )
    ref = scaled_adapter_sum(z, *sources, omega.detach(), backend="reference")
    assert torch.equal(out.isnan().cpu(), ref.isnan())
    assert out[2].isnan().all() and not out[[0, 1, 3, 4, 5]].isnan().any()


def test_outputs_do_not_alias_inputs():
    z, omega, res, _ = make_inputs((5,), n=2, d=40)
    zc, om, rc = (cast(t, torch.float32) for t in (z, omega, res))
    packed = pack_sources(*cast(make_sources(2, 4, 40), torch.float32))
    call = Composition(
        zc.detach(), packed.w_down, packed.b_down, packed.w_up, packed.b_up, packed.source_index,
        om.detach(), None, None, None, rc.detach(), "relu", True,
    )  # fmt: skip
    out, pre = triton_backend.forward(call)
    assert pre.shape == (5, 8) and out.data_ptr() != pre.data_ptr()
    g = torch.randn_like(out)
    grads = triton_backend.backward(call, pre, g, Gradients(*[True] * 6 + [False]))
    grads = [g.new_empty(0) if t is None else t for t in grads]  # absent: None, shown empty
    ptrs = [t.data_ptr() for t in grads if t.numel()]
    assert len(set(ptrs)) == len(ptrs)
    assert grads[-1].numel() == 0


def test_only_omega_needs_grad(path):
    """Frozen input and sources: only M = Sᵀ·g runs in the backward (no dP kernel)."""
    z, omega, _, rs = make_inputs((2, 9), n=3, d=40, row_scale=True)
    check(
        torch.float32,
        z.detach(),
        make_sources(3, 0, 40, hetero=[3, 8, 5]),
        omega,
        None,
        row_scale=rs.detach(),
    )


def test_non_contiguous_inputs(path):
    g = torch.Generator().manual_seed(8)
    z = torch.randn(40, 8, generator=g, dtype=torch.float64).T.requires_grad_()  # [8, 40], transposed view
    omega = torch.randn(40, 3, generator=g, dtype=torch.float64).T.requires_grad_()
    assert not z.is_contiguous() and not omega.is_contiguous()
    wd, bd, wu, bu = make_sources(3, 5, 40)
    wd = wd.transpose(1, 2).contiguous().transpose(1, 2)
    check(torch.float32, z, (wd, bd, wu, bu), omega)


# ----------------------------------------------------------------------------- launchers vs *_ref


def _packed(n=3, d=40, hetero=(3, 8, 5), dtype=torch.float32, seed=0):
    return pack_sources(*cast(make_sources(n, 0, d, hetero=list(hetero), seed=seed), dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_rs", [False, True])
def test_down_projection_launcher(dtype, with_rs):
    p = _packed(dtype=dtype)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(19, 40, generator=g).to(DEVICE, dtype)
    rs = torch.rand(19, 3, generator=g).to(DEVICE, dtype) if with_rs else None
    z = z.T.contiguous().T  # column-major: strides are passed, not assumed
    for act in ("relu", "gelu"):
        pre, s = K.down_projection(z, p.w_down, p.b_down, p.source_index, rs, act, True)
        pre_r, s_r = K.down_projection_ref(z, p.w_down, p.b_down, p.source_index, rs, act, True)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(pre, pre_r, rtol=tol, atol=tol)
        torch.testing.assert_close(s, s_r, rtol=tol, atol=tol)
    pre, _ = K.down_projection(z, p.w_down, p.b_down, p.source_index, rs, "relu", False)
    assert pre.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias_kind", ["none", "vector", "rows"])
@pytest.mark.parametrize("fold", [True, False])
def test_up_projection_launcher(dtype, bias_kind, fold):
    p = _packed(dtype=dtype)
    g = torch.Generator().manual_seed(3)
    t, d, r = 13, 40, p.total_rank
    s = torch.randn(t, r, generator=g).to(DEVICE, dtype)
    omega = torch.randn(3, d, generator=g).to(DEVICE, dtype) if fold else None
    bias = {"none": None, "vector": torch.randn(d, generator=g), "rows": torch.randn(t, d, generator=g)}[
        bias_kind
    ]
    bias = None if bias is None else bias.to(DEVICE)
    res = torch.randn(t, d, generator=g).to(DEVICE, dtype)
    out = K.up_projection(s, p.w_up, omega, p.source_index, bias, res)
    ref = K.up_projection_ref(s, p.w_up, omega, p.source_index, bias, res)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_up_projection_uniform_omega_and_transposed_weight():
    """[N, 1] ω broadcasts over d; any W strides work (the backward feeds Dᵀ)."""
    p = _packed()
    g = torch.Generator().manual_seed(4)
    s = torch.randn(9, p.total_rank, generator=g).to(DEVICE)
    omega = torch.randn(3, 1, generator=g).to(DEVICE)
    w_t = p.w_up.T.contiguous().T  # same values, column-major
    out = K.up_projection(s, w_t, omega, p.source_index, None)
    torch.testing.assert_close(
        out, K.up_projection_ref(s, p.w_up, omega, p.source_index, None), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_forward_launcher(dtype):
    p = _packed(dtype=dtype, d=100)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(21, 100, generator=g).to(DEVICE, dtype)
    omega = torch.randn(3, 100, generator=g).to(DEVICE, dtype)
    rs = torch.rand(21, 3, generator=g).to(DEVICE, dtype)
    bias = torch.randn(21, 100, generator=g).to(DEVICE)
    res = torch.randn(21, 100, generator=g).to(DEVICE, dtype)
    args = (z, p.w_down, p.b_down, p.w_up, omega, p.source_index, bias, res, rs, "silu", True)
    out, pre = K.fused_forward(*args)
    out_r, pre_r = K.fused_forward_ref(*args)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(pre, pre_r, rtol=tol, atol=tol)
    torch.testing.assert_close(out, out_r, rtol=tol, atol=tol)


def test_fused_forward_rejects_large_rank(monkeypatch):
    monkeypatch.setattr(KF, "FUSED_MAX_R", 8)
    p = _packed(dtype=torch.float16)
    z = torch.zeros(2, 40, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="R=16"):
        K.fused_forward(z, p.w_down, p.b_down, p.w_up, None, p.source_index, torch.zeros(40, device=DEVICE))
    monkeypatch.setattr(KF, "FUSED_MAX_R_FP32", 8)
    p = _packed()
    with pytest.raises(ValueError, match="float32 operands; got R=16"):
        K.fused_forward(z.float(), p.w_down, p.b_down, p.w_up, None, p.source_index, z.new_zeros(40).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_rs", [False, True])
@pytest.mark.parametrize("uniform", [False, True], ids=["vector", "uniform"])
def test_grad_pre_launcher(dtype, with_rs, uniform):
    p = _packed(dtype=dtype)
    g = torch.Generator().manual_seed(6)
    t, d = 23, 40
    grad = torch.randn(t, d, generator=g).to(DEVICE, dtype)
    pre = torch.randn(t, p.total_rank, generator=g).to(DEVICE, dtype)
    omega = torch.randn(3, 1 if uniform else d, generator=g).to(DEVICE, dtype)
    rs = torch.rand(t, 3, generator=g).to(DEVICE, dtype) if with_rs else None
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for act in ("relu", "tanh"):
        args = (grad, pre, p.w_up, omega, p.source_index, rs, act, True)
        d_pre, gs = K.grad_pre(*args)
        d_pre_r, gs_r = K.grad_pre_ref(*args)
        assert gs.dtype == torch.float32 and d_pre.dtype == dtype
        torch.testing.assert_close(d_pre, d_pre_r, rtol=tol, atol=tol)
        torch.testing.assert_close(gs, gs_r, rtol=tol, atol=tol)
    d_pre, gs = K.grad_pre(grad, pre, p.w_up, None, p.source_index)
    torch.testing.assert_close(
        d_pre, K.grad_pre_ref(grad, pre, p.w_up, None, p.source_index)[0], rtol=tol, atol=tol
    )
    assert gs.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("prologue", ["plain", "act", "act_rs"])
def test_tn_gemm_launcher(dtype, splits, prologue):
    """Aᵀ·B over tokens, split deterministically over T (T=300: chunks of 128, a ragged tail)."""
    g = torch.Generator().manual_seed(7)
    t, r, d = 300, 16, 40
    a = torch.randn(t, r, generator=g).to(DEVICE, dtype)
    b = torch.randn(t, d, generator=g).to(DEVICE, dtype)
    src = torch.tensor([0] * 3 + [1] * 8 + [2] * 5, device=DEVICE)
    kw = {}
    if prologue != "plain":
        kw = {"activation": "gelu", "source_index": src}
    if prologue == "act_rs":
        kw["row_scale"] = torch.rand(t, 3, generator=g).to(DEVICE, dtype)
    out = K.tn_gemm(a, b, splits=splits, **kw)
    assert out.dtype == torch.float32 and out.shape == (r, d)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, K.tn_gemm_ref(a, b, **kw), rtol=tol, atol=tol)
    assert torch.equal(out, K.tn_gemm(a, b, splits=splits, **kw))  # deterministic, no atomics
    assert torch.equal(K.tn_gemm(a[:0], b[:0], **kw), torch.zeros(r, d, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_rs", [False, True])
def test_bias_units_in_backward_kernels(dtype, with_rs):
    """The N bias units: grad_pre's extra columns g·(ω_i⊙B_i) and tn_gemm's extra rows
    Σ_t w[t, i]·g[t, :] (w = row_scale or 1), next to the unchanged R unit columns/rows."""
    p = _packed(dtype=dtype)
    g = torch.Generator().manual_seed(8)
    t, d, r = 150, 40, p.total_rank
    grad = torch.randn(t, d, generator=g).to(DEVICE, dtype)
    pre = torch.randn(t, r, generator=g).to(DEVICE, dtype)
    omega = torch.randn(3, d, generator=g).to(DEVICE, dtype)
    rs = torch.rand(t, 3, generator=g).to(DEVICE, dtype) if with_rs else None
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    args = (grad, pre, p.w_up, omega, p.source_index, rs, "gelu", True)
    d_pre, gs = K.grad_pre(*args, b_up=p.b_up)
    d_pre_r, gs_r = K.grad_pre_ref(*args, b_up=p.b_up)
    assert gs.shape == (t, r + 3) and gs.dtype == torch.float32
    torch.testing.assert_close(d_pre, d_pre_r, rtol=tol, atol=tol)
    torch.testing.assert_close(gs, gs_r, rtol=tol, atol=tol)
    torch.testing.assert_close(gs[:, :r], K.grad_pre(*args)[1], rtol=0, atol=0)
    kw = {"activation": "gelu", "source_index": p.source_index, "row_scale": rs, "num_sources": 3}
    for splits in (1, 2):
        m_ext = K.tn_gemm(pre, grad, splits=splits, **kw)
        assert m_ext.shape == (r + 3, d)
        torch.testing.assert_close(m_ext, K.tn_gemm_ref(pre, grad, **kw), rtol=tol, atol=tol)
        w = rs.float() if with_rs else torch.ones(t, 3, device=DEVICE)
        torch.testing.assert_close(m_ext[r:], w.T @ grad.float(), rtol=tol, atol=tol)
    assert torch.equal(K.tn_gemm(pre[:0], grad[:0], **kw), torch.zeros(r + 3, d, device=DEVICE))


def test_bias_units_only_bias_grad():
    """Only b_up trains (no ω, no W_up): dB still comes from tn_gemm's bias-unit rows."""
    z, omega, res, rs = make_inputs((9,), n=3, d=24, row_scale=True)
    wd, bd, wu, bu = make_sources(3, 4, 24)
    bu.requires_grad_()
    check(torch.float32, z.detach(), (wd, bd, wu, bu), omega.detach(), res.detach(), row_scale=rs.detach())


def test_long_sequence_splits_tokens():
    """T=300: the backward's token split (2 chunks) through the whole op, with row_scale."""
    z, omega, res, rs = make_inputs((300,), n=2, d=24, row_scale=True)
    check(torch.float32, z, make_sources(2, 4, 24, grad=True), omega, res, row_scale=rs)


# ----------------------------------------------------------------------------- GPU only


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [True, False])
def test_gpu_low_precision(monkeypatch, dtype, fused):
    monkeypatch.setattr(triton_backend, "USE_FUSED", fused)
    z, omega, res, rs = make_inputs((4, 37), n=4, d=200, row_scale=True)
    check(dtype, z, make_sources(4, 0, 200, hetero=[16, 8, 24, 12], grad=True), omega, res, row_scale=rs)


@needs_cuda
@pytest.mark.gpu
def test_gpu_large_rank_two_kernel_path():
    z, omega, res, _ = make_inputs((300,), n=8, d=256)
    check(torch.bfloat16, z, make_sources(8, 96, 256, grad=True), omega, res)


@needs_cuda
@pytest.mark.gpu
def test_gpu_measured_path_choice(monkeypatch):
    """The real measurement (triton.testing.do_bench) picks a path and the result stays exact."""
    from scalearn_fast.ops import path_choice

    monkeypatch.setenv("SCALEARN_FAST_AUTOTUNE", "1")  # measuring is on with autotune (configs stay small)
    monkeypatch.setattr(triton_backend, "USE_FUSED", None)
    monkeypatch.setattr(path_choice, "_CHOICES", {})
    z, omega, res, _ = make_inputs((300,), n=8, d=256)
    check(torch.bfloat16, z, make_sources(8, 16, 256, grad=True), omega, res)
    assert len(path_choice.choices()) == 1


@pytest.mark.parametrize("faster", ["triton", "torch"])
def test_auto_backend_measures_forward_and_backward_per_class(monkeypatch, faster):
    """backend="auto" on CUDA: the faster of the Triton kernels and the torch backend, timed once
    per shape class, the forward and the backward separately; results are that backend's."""
    from scalearn_fast.ops import auto_backend, path_choice, torch_backend

    monkeypatch.setattr(path_choice, "_can_measure", lambda z: True)
    monkeypatch.setattr(path_choice, "_CHOICES", {})
    monkeypatch.setattr(triton_backend, "USE_FUSED", True)  # no fused/two-kernel timing inside
    timed = []

    def fake_time(fn):
        name = "triton" if len(timed) % 2 == 0 else "torch"  # candidates are timed in order
        timed.append(name)
        fn()
        return 1.0 if name == faster else 2.0

    monkeypatch.setattr(path_choice, "_time_ms", fake_time)
    chosen = {"triton": triton_backend, "torch": torch_backend}[faster]
    z, omega, res, _ = make_inputs((7,), n=2, d=24)
    packed = pack_sources(*make_sources(2, 4, 24))
    call = Composition(z.detach().float(), packed.w_down.float(), packed.b_down.float(), packed.w_up.float(),
                       packed.b_up.float(), packed.source_index, omega.detach().float(), None, None, None,
                       res.detach().float(), "relu", True)  # fmt: skip
    for _ in range(2):
        out, pre = auto_backend.forward(call)
        expect_out, expect_pre = chosen.forward(call)
        assert torch.equal(out, expect_out) and torch.equal(pre, expect_pre)
        g = torch.randn_like(out)
        needs = Gradients(True, False, False, False, False, True, False)
        bargs = (call, pre, g, needs)
        for got, want in zip(auto_backend.backward(*bargs), chosen.backward(*bargs), strict=True):
            assert (got is None and want is None) or torch.equal(got, want)
    assert timed == ["triton", "torch"] * 2  # forward and backward classes, each timed once
    assert sorted(k[0] for k in path_choice.choices()) == ["backward", "forward"]
    assert set(path_choice.choices().values()) == {faster}


def test_auto_backend_without_measuring_keeps_earlier_choices(monkeypatch):
    """Where nothing can be timed (CUDA graph capture, autotune off), a class chosen earlier keeps
    its choice and an unseen class runs the Triton kernels, uncached."""
    from scalearn_fast.ops import auto_backend, path_choice, torch_backend

    monkeypatch.setattr(path_choice, "_CHOICES", {})
    monkeypatch.setattr(path_choice, "_time_ms", lambda fn: pytest.fail("nothing may be timed"))
    ran = []
    for name, module in (("triton", triton_backend), ("torch", torch_backend)):
        monkeypatch.setattr(module, "forward", lambda *a, name=name: ran.append(name) or ("out", "pre"))
    packed = pack_sources(*make_sources(2, 4, 24))
    call = Composition(torch.zeros(3, 24, dtype=torch.float64), packed.w_down, packed.b_down, packed.w_up,
                       packed.b_up, packed.source_index, None, packed.w_up, packed.b_up[0], None, None,
                       "relu", False)  # fmt: skip
    monkeypatch.setattr(path_choice, "_can_measure", lambda z: False)
    auto_backend.forward(call)
    assert ran == ["triton"] and path_choice.choices() == {}
    key = ("forward", *path_choice.shape_class(call.z, 8, False, False, True, False))
    path_choice._CHOICES[key] = "torch"  # as if measured in a warm-up before a capture
    auto_backend.forward(call)
    assert ran == ["triton", "torch"]


@needs_cuda
@pytest.mark.gpu
def test_gpu_auto_backend_is_exact_and_records_its_choices(monkeypatch):
    from scalearn_fast.ops import path_choice

    monkeypatch.setenv("SCALEARN_FAST_AUTOTUNE", "1")
    monkeypatch.setattr(path_choice, "_CHOICES", {})
    z, omega, res, _ = make_inputs((300,), n=8, d=256)
    sources = cast(make_sources(8, 16, 256), torch.bfloat16)
    zz, om, rr = (cast(t, torch.bfloat16) for t in (z, omega, res))
    out = scaled_adapter_sum(zz, *sources, om, rr, backend="auto")
    out.float().sum().backward()
    ref = scaled_adapter_sum(z, *make_sources(8, 16, 256), omega, res, backend="reference")
    assert (out.float().cpu() - ref).abs().max() < 0.1
    assert sorted(k[0] for k in path_choice.choices() if k[0] in ("forward", "backward")) == [
        "backward",
        "forward",
    ]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_eval_layer_replays_in_a_cuda_graph(monkeypatch, backend):
    """After a warm-up (autotuning, measured choices, the inference plan), an eval-mode layer is
    captured in a CUDA graph and its replay equals the eager call: serving can hide host time."""
    from scalearn_fast import ScaLearnLayer
    from scalearn_fast.ops import path_choice

    monkeypatch.setenv("SCALEARN_FAST_AUTOTUNE", "1")
    monkeypatch.setattr(path_choice, "_CHOICES", {})
    wd, bd, wu, bu = cast(make_sources(8, 16, 256), torch.bfloat16)
    layer = ScaLearnLayer(wd, bd, wu, bu, omega_dropout=0.0, backend=backend).eval()
    z, _, res, _ = make_inputs((4, 64), n=8, d=256)
    z, res = cast(z, torch.bfloat16).detach(), cast(res, torch.bfloat16).detach()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                eager = layer.compose(z, res)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer.compose(z, res)
        z.mul_(0.5)  # new input in the same buffer
        graph.replay()
        expect = layer.compose(z, res)
    torch.cuda.synchronize()
    assert not torch.equal(eager, expect)
    assert torch.equal(captured, expect)


def test_auto_backend_mixes_forward_and_backward_choices(monkeypatch):
    """Both backends save the same P [T, R], so a forward on one and a backward on the other
    give the same gradients."""
    from scalearn_fast.ops import path_choice
    from scalearn_fast.ops.dispatch import run

    monkeypatch.setattr(path_choice, "_can_measure", lambda z: False)  # only the choices below
    monkeypatch.setattr(triton_backend, "USE_FUSED", True)
    z, omega, res, _ = make_inputs((9,), n=2, d=24)
    packed = pack_sources(*make_sources(2, 4, 24))
    leaves = [t.detach().float().requires_grad_() for t in (z, omega, res)]
    weights = [packed.w_down.float(), packed.b_down.float(), packed.w_up.float(), packed.b_up.float()]
    call = Composition(
        leaves[0], *weights, packed.source_index, leaves[1], None, None, None, leaves[2], "relu", True
    )
    flags = (False, True, False, True)
    from scalearn_fast.ops import torch_backend

    ran = []
    for name, module in (("torch", torch_backend), ("triton", triton_backend)):
        for fn in ("forward", "backward"):
            real = getattr(module, fn)
            monkeypatch.setattr(module, fn, lambda *a, real=real, tag=(fn, name): ran.append(tag) or real(*a))
    results = {}
    for fwd, bwd in (("torch", "torch"), ("torch", "triton"), ("triton", "torch")):
        ran.clear()
        monkeypatch.setattr(path_choice, "_CHOICES", {})
        path_choice._CHOICES[("forward", *path_choice.shape_class(leaves[0], 8, *flags))] = fwd
        needs = [True, False, False, False, False, True, False]
        path_choice._CHOICES[("backward", *path_choice.shape_class(leaves[0], 8, False, *needs))] = bwd
        out, _ = run(call, "auto")
        grads = torch.autograd.grad((out * torch.cos(out.detach())).sum(), leaves)
        results[(fwd, bwd)] = (out.detach(), *grads)
        assert ran == [("forward", fwd), ("backward", bwd)]
    base = results[("torch", "torch")]
    for key in (("torch", "triton"), ("triton", "torch")):
        for got, want in zip(results[key], base, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(key))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter case is a CPU one")
def test_interpreter_runs_without_pinning_the_autotuner():
    """TRITON_INTERPRET=1 alone must do: the autotuner cannot time configs without a device."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SCALEARN_FAST_AUTOTUNE"}
    env["TRITON_INTERPRET"] = "1"
    code = (
        "import torch\n"
        "from scalearn_fast import scaled_adapter_sum\n"
        "g = torch.Generator().manual_seed(0)\n"
        "z = torch.randn(5, 16, generator=g)\n"
        "src = (torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, generator=g),\n"
        "       torch.randn(2, 16, 4, generator=g), torch.randn(2, 16, generator=g))\n"
        "omega = torch.randn(2, 16, generator=g)\n"
        "got = scaled_adapter_sum(z, *src, omega, backend='triton')\n"
        "ref = scaled_adapter_sum(z, *src, omega, backend='reference')\n"
        "torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_launchers_accept_strided_vectors_and_check_the_bias_shape():
    """b_down, source_index and biases given as strided views index like contiguous ones."""
    g = torch.Generator().manual_seed(7)
    t, d, n, r = 9, 24, 3, 4
    z = torch.randn(t, d, generator=g)
    w_down = torch.randn(n * r, d, generator=g)
    b_down = torch.randn(2 * n * r, generator=g)[::2]  # stride 2
    src = torch.arange(n).repeat_interleave(r).repeat(2)[::2].sort().values  # a fresh tensor
    src_strided = torch.stack([src, src], 1)[:, 0]  # stride 2, same values
    pre, hidden = K.down_projection(z, w_down, b_down, src_strided, None, "relu", True)
    _, ref = K.down_projection_ref(z, w_down, b_down, src, None, "relu", True)
    torch.testing.assert_close(hidden, ref, rtol=1e-5, atol=1e-5)
    w_up, omega = torch.randn(d, n * r, generator=g), torch.randn(n, d, generator=g)
    bias = torch.randn(2 * d, generator=g)[::2]
    got = K.up_projection(hidden, w_up, omega, src_strided, bias)
    torch.testing.assert_close(got, K.up_projection_ref(hidden, w_up, omega, src, bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"bias has shape \[1, 24\]; expected \[d=24\] or \[T=9, d=24\]"):
        K.up_projection(hidden, w_up, omega, src, bias[None])


@needs_cuda
def test_float64_on_a_gpu_runs_the_torch_backend():
    """The kernels accumulate in fp32 and do not compile for fp64 operands on a GPU."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(6, 16, generator=g, dtype=torch.float64)
    src = [
        t.to(torch.float64)
        for t in (torch.randn(2, 4, 16), torch.randn(2, 4), torch.randn(2, 16, 4), torch.randn(2, 16))
    ]
    omega = torch.randn(2, 16, generator=g, dtype=torch.float64)
    ref = scaled_adapter_sum(z, *src, omega, backend="reference")
    for backend in ("triton", "auto"):
        args = [t.cuda() for t in (z, *src, omega)]
        torch.testing.assert_close(
            scaled_adapter_sum(*args, backend=backend).cpu(), ref, rtol=1e-10, atol=1e-10
        )
