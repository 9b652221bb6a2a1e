"""Minimal reproducers of the defects the fuzz tolerates today (``harness.KNOWN_DEFECTS``), and checks
that the harness itself can fail.

Each reproducer asserts the right behaviour (the oracle's answer, or a clear error where the issue
allows one) and is marked ``xfail(strict=True)`` while its defect is listed in ``KNOWN_DEFECTS``:
fixing the defect makes it XPASS, which fails the run. Then delete the entry from ``KNOWN_DEFECTS``
(the mark goes with it, and the fuzz stops tolerating that defect).
"""

from __future__ import annotations

import math

import pytest
import torch

from scalearn_fast import scaled_adapter_sum
from tests.fuzz import oracle
from tests.fuzz.cases import NEEDS_INTERPRETER, backend_params, triton_path
from tests.fuzz.harness import F64, KNOWN_DEFECTS, compare, error_outcome, names_an_argument

# numpy (the Triton interpreter) warns on the inf and NaN the cases feed it on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

FUSED_PATHS = [pytest.param(True, id="fused"), pytest.param(False, id="two-kernel")]


def known(name: str):
    """``xfail(strict=True)`` while ``name`` is a listed known defect, else no mark."""
    if name in KNOWN_DEFECTS:
        return pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[name])
    return pytest.mark.skipif(False, reason="fixed")  # a no-op mark (usable in pytest.param too)


def sources(n, r, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    wd = torch.randn(n, r, d, generator=g, dtype=F64) * 0.5
    bd = torch.randn(n, r, generator=g, dtype=F64) * 0.1
    wu = torch.randn(n, d, r, generator=g, dtype=F64) * 0.5
    bu = torch.randn(n, d, generator=g, dtype=F64) * 0.1
    return [t.to(dtype) for t in (wd, bd, wu, bu)]


def assert_correct_or_clear(run, expect64: torch.Tensor, expect_low: torch.Tensor, extra_ok=None):
    try:
        out = run()
    except Exception as exc:  # noqa: BLE001
        problem = error_outcome(exc, extra_ok)
        assert problem is None, problem
        return
    problem = compare(out, expect64, expect_low, "out")
    assert problem is None, problem


# ----------------------------------------------------------------------- issue 16 item 1


def _double_backward(fn, z, omega):
    out = fn(z, omega)
    (gz,) = torch.autograd.grad(out.sum(), z, create_graph=True)
    (d_omega,) = torch.autograd.grad(out.sum() + gz.pow(2).sum(), omega)
    return d_omega


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("torch", marks=known("double-backward")),
        pytest.param("triton", marks=[known("double-backward"), NEEDS_INTERPRETER]),
        pytest.param("auto", marks=known("double-backward")),
    ],
)
def test_double_backward_is_correct_or_refused(backend):
    """``gz = grad(out.sum(), z, create_graph=True)``; then dω of ``out.sum() + gz.pow(2).sum()``.
    Today gz.requires_grad is False on the fused backends and dω silently lacks the penalty term."""
    src = sources(3, 4, 5, torch.float32)
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(6, 5, generator=g)
    om0 = torch.randn(3, 5, generator=g) + 0.7

    def run(fn, dtype):
        z, om = z0.to(dtype).requires_grad_(), om0.to(dtype).requires_grad_()
        return _double_backward(fn, z, om)

    ref64 = run(lambda z, om: oracle.scaled_adapter_sum(z, *src, om), F64)
    ref32 = run(lambda z, om: oracle.scaled_adapter_sum(z, *src, om, dtype=torch.float32), torch.float32)

    def clear(msg):
        return "backward" in msg.lower() or "create_graph" in msg

    assert_correct_or_clear(
        lambda: run(lambda z, om: scaled_adapter_sum(z, *src, om, backend=backend), torch.float32),
        ref64,
        ref32,
        clear,
    )


# ----------------------------------------------------------------------- issue 16 item 5


@pytest.mark.parametrize("use_fused", FUSED_PATHS)
@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(t, marks=known("triton-interpreter-fp64-bf16"), id=str(t)[6:])
        for t in (torch.float64, torch.bfloat16)
    ],
)
@NEEDS_INTERPRETER
def test_triton_interpreter_fp64_bf16_is_correct_or_refused(dtype, use_fused):
    """N=3, r=4, d=5 under TRITON_INTERPRET=1: today errors of ~1 (fp64) and ~1e9 (bf16)."""
    src = sources(3, 4, 5, dtype)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(7, 5, generator=g, dtype=F64).to(dtype)
    om = (torch.randn(3, 5, generator=g, dtype=F64) + 0.7).to(dtype)

    def run():
        with triton_path(use_fused):
            return scaled_adapter_sum(z, *src, om, backend="triton")

    assert_correct_or_clear(
        run, oracle.scaled_adapter_sum(z, *src, om), oracle.scaled_adapter_sum(z, *src, om, dtype=dtype)
    )


# ----------------------------------------------------------------------- issue 16 item 6


BACKENDS_FAST = [
    pytest.param("torch", None, id="torch"),
    pytest.param("auto", None, id="auto"),
    pytest.param("triton", True, id="triton-fused", marks=NEEDS_INTERPRETER),
    pytest.param("triton", False, id="triton-two-kernel", marks=NEEDS_INTERPRETER),
]


@pytest.mark.parametrize("where", ["omega", "row_scale"])
@pytest.mark.parametrize(("backend", "use_fused"), BACKENDS_FAST)
def test_inf_omega_or_row_scale_is_nonfinite_where_the_loop_is(backend, use_fused, where):
    """ω[0, 1] = +inf (or row_scale[1, 0] = +inf with ω = 1): the loop gives ±inf in that column
    (or row). The documented behaviour (harness.DOCUMENTED): non-finite exactly where the loop is,
    NaN only where the loop has ±inf (the applied ω meets ReLU's zeros), everything else equal."""
    if backend == "triton":
        pytest.importorskip("triton")
    src = sources(2, 4, 5, torch.float32)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 5, generator=g)
    om = torch.randn(2, 5, generator=g) + 0.7
    rs = None
    if where == "omega":
        om[0, 1] = math.inf
    else:
        om = torch.ones(2, 5)
        rs = torch.rand(3, 2, generator=g) + 0.1
        rs[1, 0] = math.inf
    ref = oracle.scaled_adapter_sum(z, *src, om, row_scale=rs)
    assert ref.isinf().any() and not ref.isnan().any()  # the loop's answer: ±inf, no NaN
    with triton_path(use_fused), torch.no_grad():
        out = scaled_adapter_sum(z, *src, om, backend=backend, row_scale=rs).double()
    assert torch.equal(out.isfinite(), ref.isfinite())
    assert torch.equal(out.isnan(), out.isnan() & ref.isinf())  # NaN only where the loop has ±inf
    assert torch.equal(out.isinf(), ref.isinf() & out.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-5)


@known("fused-padding-nonfinite")
@NEEDS_INTERPRETER
def test_fused_kernel_keeps_a_minus_inf_row_finite():
    """z[1] = [-inf, 0.1, 0.2, 0.3] with every W_down[:, 0] > 0: each pre-activation is -inf, relu
    gives 0, and the loop's answer for that row is the bias Σ ω_i ⊙ b_up_i. R = 3 is padded in the
    fused kernel, whose padded columns compute -inf·0 = NaN."""
    src = sources(1, 3, 4, torch.float32)
    src[0][..., 0] = src[0][..., 0].abs() + 0.1
    z = torch.tensor([[0.5, -0.2, 0.1, 0.3], [-math.inf, 0.1, 0.2, 0.3]])
    om = torch.full((1, 4), 0.9)
    ref = oracle.scaled_adapter_sum(z, *src, om)
    assert ref.isfinite().all()

    def run():
        with triton_path(True), torch.no_grad():
            return scaled_adapter_sum(z, *src, om, backend="triton")

    assert_correct_or_clear(run, ref, oracle.scaled_adapter_sum(z, *src, om, dtype=torch.float32))


@known("fp16-fold-overflow")
@pytest.mark.parametrize(("backend", "use_fused"), BACKENDS_FAST)
def test_fp16_fold_does_not_overflow(backend, use_fused):
    """fp16, ω = 3000, W_up = 30, act = 0.01: the loop gives 0.3·3000 = 900; the fold W_up·ω = 90000
    overflows fp16 (max 65504) and the result is inf."""
    h = torch.float16
    src = [
        torch.tensor([[[0.01, 0.0]]], dtype=h),  # w_down [1, 1, 2]
        torch.zeros(1, 1, dtype=h),
        torch.full((1, 2, 1), 30.0, dtype=h),  # w_up [1, 2, 1]
        torch.zeros(1, 2, dtype=h),
    ]
    z = torch.tensor([[1.0, 0.0]], dtype=h)
    om = torch.full((1, 2), 3000.0, dtype=h)
    ref = oracle.scaled_adapter_sum(z, *src, om)
    assert torch.allclose(ref, torch.full_like(ref, 900.0), rtol=1e-2)

    def run():
        with triton_path(use_fused), torch.no_grad():
            return scaled_adapter_sum(z, *src, om, backend=backend)

    assert_correct_or_clear(run, ref, oracle.scaled_adapter_sum(z, *src, om, dtype=h))


# ----------------------------------------------------------------------- found by this fuzz


@known("omega-none")
@pytest.mark.parametrize("backend", backend_params())
def test_omega_none_is_a_clear_error(backend):
    src = sources(2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="omega"):
        scaled_adapter_sum(torch.randn(3, 4), *src, None, backend=backend)


# ----------------------------------------------------------------------- the harness can fail


def test_harness_flags_wrong_answers_and_unclear_errors():
    ref = torch.linspace(-2, 2, 12, dtype=F64).reshape(3, 4)
    low = ref.float()
    assert compare(low, ref, low, "out") is None
    assert compare(low + 1e-3, ref, low, "out").kind == "tolerance"
    assert compare(low.half(), ref, low, "out").kind == "dtype"
    assert compare(low[:2], ref, low, "out").kind == "shape"
    nan = low.clone()
    nan[0, 0] = math.nan
    assert compare(nan, ref, low, "out").kind == "nonfinite"
    inf_ref = ref.clone()
    inf_ref[1, 1] = -math.inf
    assert compare(low, inf_ref, low, "out").kind == "nonfinite"
    assert error_outcome(ValueError("omega has shape [2], expected [N=2, d=4]")) is None
    assert error_outcome(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is not None
    assert error_outcome(IndexError("list index out of range")) is not None
    assert error_outcome(TypeError("z must be a tensor")) is not None  # a TypeError is not a clear error
    overflow = torch.tensor([1.0, 2.0], dtype=F64)  # representable, but the fp16 loop overflowed
    low16 = torch.tensor([math.inf, 2.0], dtype=torch.float16)
    assert compare(torch.tensor([math.nan, 2.0], dtype=torch.float16), overflow, low16, "out") is None
    assert (
        compare(torch.tensor([math.inf, 2.0], dtype=torch.float16), overflow, overflow.half(), "out").kind
        == "nonfinite"
    )
    assert names_an_argument("row_scale has shape") and not names_an_argument("sizes do not match")


def test_oracle_matches_a_hand_computed_case():
    """One source, r = 1, d = 2: A(z) = W_up·relu(W_down·z + b_down) + b_up by hand."""
    z = torch.tensor([[1.0, 2.0]], dtype=F64)
    wd, bd = torch.tensor([[[0.5, -1.0]]], dtype=F64), torch.tensor([[2.0]], dtype=F64)  # pre = 0.5
    wu, bu = torch.tensor([[[2.0], [-4.0]]], dtype=F64), torch.tensor([[0.1, 0.2]], dtype=F64)
    om = torch.tensor([[3.0, 0.5]], dtype=F64)
    out = oracle.scaled_adapter_sum(
        z, wd, bd, wu, bu, om, torch.ones(1, 2, dtype=F64), row_scale=torch.tensor([[2.0]])
    )
    # A = [2·0.5 + 0.1, -4·0.5 + 0.2] = [1.1, -1.8]; ·2 (row_scale) ·ω + 1
    assert torch.allclose(out, torch.tensor([[3.0 * 2.2 + 1.0, 0.5 * -3.6 + 1.0]], dtype=F64))
