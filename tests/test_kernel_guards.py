"""The Triton launchers' edges: non-finite inputs against the torch reference, operand dtypes
they refuse, and how absent inputs reach the kernels (``kernels/common.py``).

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); shapes stay tiny.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from scalearn_fast import scaled_adapter_sum  # noqa: E402
from scalearn_fast._kernels import load_kernels  # noqa: E402
from scalearn_fast.ops import pack_sources, triton_backend  # noqa: E402
from scalearn_fast.ops.activations import ACTIVATIONS, activation_id  # noqa: E402

K = load_kernels()
KC = K.common
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = not torch.cuda.is_available()  # tests/conftest.py sets TRITON_INTERPRET=1 then
KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _sources(n=2, r=4, d=16, seed=0, positive_down=False):
    g = torch.Generator().manual_seed(seed)
    wd = torch.randn(n, r, d, generator=g) * 0.3
    if positive_down:
        wd = wd.abs() + 0.05  # z·Dᵀ of a -inf row is -inf in every unit, never inf - inf
    bd = torch.randn(n, r, generator=g) * 0.1
    wu = torch.randn(n, d, r, generator=g) * 0.3
    bu = torch.randn(n, d, generator=g) * 0.1
    return wd, bd, wu, bu


def _packed(dtype, **kw):
    return pack_sources(*(t.to(DEVICE, dtype) for t in _sources(**kw)))


# ----------------------------------------------------------------------------- non-finite rows

# the padding's -inf·0 is a NaN numpy warns about inside the interpreter's tl.dot; it is masked out
nan_in_padding = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@nan_in_padding
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_minus_inf_row_gives_the_bias_in_both_forward_paths(dtype, activation):
    """A z row of -inf: every unit's P is -inf, relu gives 0 (tanh -1), so the row's out is the
    loop's finite value. R = 8 pads to 16 columns, where z·Dᵀ meets D's zero padding as
    -inf·0 = NaN; that must not reach the output."""
    p = _packed(dtype, positive_down=True)
    g = torch.Generator().manual_seed(1)
    t, d = 5, 16
    z = torch.randn(t, d, generator=g).to(DEVICE, dtype)
    z[2] = float("-inf")
    omega = torch.rand(2, d, generator=g).to(DEVICE, dtype) + 0.5
    bias = torch.randn(d, generator=g).to(DEVICE)
    res = torch.randn(t, d, generator=g).to(DEVICE, dtype)
    args = (z, p.w_down, p.b_down, p.w_up, omega, p.source_index, bias, res, None, activation, True)
    expect, pre_expect = K.fused_forward_ref(*args)
    assert expect[2].isfinite().all() and pre_expect[2].eq(float("-inf")).all()
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    out, pre = K.fused_forward(*args)
    torch.testing.assert_close(out, expect, rtol=tol, atol=tol)
    torch.testing.assert_close(pre, pre_expect, rtol=tol, atol=tol)
    pre2, hidden = K.down_projection(z, p.w_down, p.b_down, p.source_index, None, activation, True)
    out2 = K.up_projection(hidden, p.w_up, omega, p.source_index, bias, res)
    torch.testing.assert_close(out2, expect, rtol=tol, atol=tol)
    torch.testing.assert_close(pre2, pre_expect, rtol=tol, atol=tol)


@nan_in_padding
@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "two_kernel"])
def test_minus_inf_row_through_the_op_matches_the_reference_loop(monkeypatch, use_fused):
    monkeypatch.setattr(triton_backend, "USE_FUSED", use_fused)
    wd, bd, wu, bu = _sources(n=3, r=3, d=24, positive_down=True)  # R = 9: 7 padded columns
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 24, generator=g)
    z[1, 3] = float("-inf")
    omega = torch.rand(3, 24, generator=g) + 0.5
    res = torch.randn(2, 4, 24, generator=g)
    ref = scaled_adapter_sum(z.double(), wd.double(), bd.double(), wu.double(), bu.double(), omega.double(),
                             res.double(), backend="reference")  # fmt: skip
    assert ref[1, 3].isfinite().all()
    args = [t.to(DEVICE) for t in (z, wd, bd, wu, bu, omega, res)]
    out = scaled_adapter_sum(*args, backend="triton")
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- refused dtypes


def _launch(name, dtype):
    """Call launcher ``name`` with every operand in ``dtype`` (tiny shapes)."""
    p = _packed(torch.float32)
    t, d, r = 3, 16, p.total_rank
    z = torch.randn(t, d, device=DEVICE, dtype=dtype)
    w_down, w_up = p.w_down.to(dtype), p.w_up.to(dtype)
    omega = torch.ones(2, d, device=DEVICE, dtype=dtype)
    src = p.source_index
    if name == "down_projection":
        return K.down_projection(z, w_down, p.b_down, src)
    if name == "up_projection":
        return K.up_projection(torch.ones(t, r, device=DEVICE, dtype=dtype), w_up, omega, src, None)
    if name == "fused_forward":
        return K.fused_forward(z, w_down, p.b_down, w_up, omega, src, z.new_zeros(d))
    if name == "grad_pre":
        return K.grad_pre(z, torch.ones(t, r, device=DEVICE, dtype=dtype), w_up, omega, src)
    return K.tn_gemm(torch.ones(t, r, device=DEVICE, dtype=dtype), z)


LAUNCHERS = ["down_projection", "up_projection", "fused_forward", "grad_pre", "tn_gemm"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_refuse_float64(name):
    """fp64 never reaches a kernel: they accumulate in fp32, do not compile for fp64 on a GPU,
    and the interpreter's tl.dot is wrong for it."""
    with pytest.raises(ValueError, match=rf"^{name}: \w+ is torch.float64; the Triton kernels"):
        _launch(name, torch.float64)


@pytest.mark.skipif(not INTERPRETED, reason="bfloat16 is refused only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_refuse_bfloat16_in_the_interpreter(name):
    with pytest.raises(ValueError, match=rf"{name}: \w+ is torch.bfloat16; .*under TRITON_INTERPRET=1"):
        _launch(name, torch.bfloat16)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_run_float16(name):
    _launch(name, torch.float16)  # the accepted low-precision dtype runs everywhere


def test_float64_is_refused_on_a_gpu_too(monkeypatch):
    """Outside the interpreter bf16 is fine, fp64 still is not (the message drops the interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"z is torch.float64; the Triton kernels take float32, float16 or bf"
    ):
        KC.check_operands("down_projection", z=z)
    KC.check_operands("down_projection", z=z.bfloat16())


def test_mixed_operand_dtypes_are_named():
    p = _packed(torch.float32)
    z = torch.zeros(3, 16, device=DEVICE, dtype=torch.float16)
    with pytest.raises(
        ValueError, match="operands must share one dtype; got z torch.float16, w_down torch.float32"
    ):
        K.down_projection(z, p.w_down, p.b_down, p.source_index)
    with pytest.raises(ValueError, match="tn_gemm: operands must share one dtype"):
        K.tn_gemm(z.float(), z)


def test_tn_gemm_row_scale_needs_source_index():
    a = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="row_scale is gathered by source id"):
        K.tn_gemm(a, a, activation="relu", row_scale=torch.ones(3, 2, device=DEVICE))


def test_unknown_activation_is_named():
    p = _packed(torch.float32)
    z = torch.zeros(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="activation must be one of .*; got 'swish'"):
        K.down_projection(z, p.w_down, p.b_down, p.source_index, activation="swish")


# ----------------------------------------------------------------------------- absent inputs


def test_kernel_operands_flag_absent_inputs_and_pass_strides():
    operands = KC.KernelOperands("z:td bd", optional="omega:nd rs:tn")
    omega = KC.broadcast_omega(torch.ones(3, 1), 7)  # uniform ω: stride 0 over d, no copy
    vec = torch.arange(8.0)[::2]  # strided vector: made contiguous
    args = operands(z=torch.zeros(5, 7).T, bd=vec, omega=omega, rs=None)
    assert args["stride_z_t"] == 1 and args["stride_z_d"] == 7
    assert args["bd_ptr"].is_contiguous() and torch.equal(args["bd_ptr"], vec)
    assert (args["stride_omega_n"], args["stride_omega_d"], args["HAS_OMEGA"]) == (1, 0, True)
    assert args["rs_ptr"] is None and args["stride_rs_t"] is None and args["stride_rs_n"] is None
    assert args["HAS_RS"] is False and "HAS_Z" not in args
    with pytest.raises(ValueError, match="'z' is required"):
        operands(z=None, bd=vec, omega=None, rs=None)
    with pytest.raises(TypeError, match="kernel operands"):
        operands(z=vec, bd=vec)


def test_fused_forward_with_every_optional_input_absent():
    """No ω (W is U), bias, residual, row_scale or saved P: the kernel gets None pointers."""
    p = _packed(torch.float32)
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    args = (z, p.w_down, p.b_down, p.w_up, None, p.source_index, None)
    out, pre = K.fused_forward(*args)
    expect, _ = K.fused_forward_ref(*args)
    assert pre.numel() == 0
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- structure


def test_activation_ids_come_from_the_one_table():
    assert [activation_id(a) for a in ACTIVATIONS] == [0, 1, 2, 3, 4]
    assert ACTIVATIONS == ("relu", "gelu", "silu", "tanh", "identity")  # the ids the kernels switch on
    for path in KERNELS.glob("*.py"):
        assert "ACTIVATIONS = " not in path.read_text(), f"{path.name} keeps its own activation table"


def test_kernel_files_share_helpers_through_common_only():
    """No kernel file imports a private name from another one."""
    for path in KERNELS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module != "common":
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from .{node.module}"
