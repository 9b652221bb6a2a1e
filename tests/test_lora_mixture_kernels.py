"""The LoRA-mixture expand kernels (``kernels/lora_mixture.py``) against the float64 formulas of
the op's interface, written out here: shared down matrix (MoSLD) and per-expert down matrices,
forward and every backward output, plus the guards.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with one small tile config,
so the shapes are small and awkward: T = 1 and 37, r = 1, 5 and 8, N = 1 and 5, d_out = 24.
An output passes when max|x - ref| <= tol · max|ref| (relative to the output's scale).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from scalearn_fast._kernels import load_kernels  # noqa: E402

K = load_kernels()
KM = K.lora_mixture  # the module, for patching C_TILE and TOKEN_CHUNK
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = not torch.cuda.is_available()  # tests/conftest.py sets TRITON_INTERPRET=1 then
TOL = {torch.float32: 2e-6, torch.float16: 4e-3}
SCALING = 0.75
ALL = (True, True, True)


def make(t, n, r, d_out, *, shared, dtype=torch.float32, seed=0):
    """p, gates (top-2 of a softmax, zeros elsewhere, like a router), b_up, grad_out."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(t, r if shared else n * r, generator=g, dtype=torch.float64)
    logits = torch.randn(t, n, generator=g, dtype=torch.float64)
    top = logits.topk(min(2, n), dim=1).indices
    gates = torch.zeros_like(logits).scatter(1, top, logits.gather(1, top).softmax(1))
    b_up = torch.randn(n, d_out, r, generator=g, dtype=torch.float64) * 0.5
    grad_out = torch.randn(t, d_out, generator=g, dtype=torch.float64)
    return [x.to(DEVICE, dtype) for x in (p, gates, b_up, grad_out)]


def reference(p, gates, b_up, grad_out, scaling, shared):
    """out, dp, dgates, db_up in float64, straight from the interface's formulas."""
    p, gates, b_up, grad_out = (x.detach().double().cpu() for x in (p, gates, b_up, grad_out))
    n, _, r = b_up.shape
    p_n = [p if shared else p[:, i * r : (i + 1) * r] for i in range(n)]
    out = scaling * sum(gates[:, i, None] * p_n[i] @ b_up[i].T for i in range(n))
    g_n = [grad_out @ b_up[i] for i in range(n)]
    if shared:
        dp = scaling * sum(gates[:, i, None] * g_n[i] for i in range(n))
    else:
        dp = torch.cat([scaling * gates[:, i, None] * g_n[i] for i in range(n)], 1)
    dgates = torch.stack([scaling * (g_n[i] * p_n[i]).sum(1) for i in range(n)], 1)
    db_up = torch.stack([scaling * (gates[:, i, None] * grad_out).T @ p_n[i] for i in range(n)])
    return out, dp, dgates, db_up


def assert_rel(x, ref, dtype, what):
    assert x is not None and tuple(x.shape) == tuple(ref.shape), what
    if not ref.numel():
        return
    err = (x.double().cpu() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max err {err:.3e} > {TOL[dtype]:.0e} x {scale:.3e}"


def check(t, n, r, d_out, *, shared, dtype=torch.float32, needs=ALL, seed=0):
    p, gates, b_up, grad_out = make(t, n, r, d_out, shared=shared, dtype=dtype, seed=seed)
    ref = reference(p, gates, b_up, grad_out, SCALING, shared)
    out = K.lora_mixture_expand(p, gates, b_up, SCALING, shared=shared)
    assert out.dtype == dtype
    assert_rel(out, ref[0], dtype, "out")
    grads = K.lora_mixture_expand_backward(p, gates, b_up, grad_out, SCALING, shared=shared, needs=needs)
    for name, x, like, want, r64 in zip(("dp", "dgates", "db_up"), grads, (p, gates, b_up), needs, ref[1:]):  # noqa: B905
        if not want:
            assert x is None, name
            continue
        assert x.dtype == like.dtype, name
        assert_rel(x, r64, dtype, name)


def test_reference_backward_is_the_forwards_gradient():
    """The interface's backward formulas are the autograd of its forward (float64)."""
    for shared in (True, False):
        p, gates, b_up, grad_out = (
            x.double().cpu().requires_grad_() for x in make(4, 3, 2, 5, shared=shared)
        )
        out, *grads = reference(p, gates, b_up, grad_out, SCALING, shared)
        p, gates, b_up = (x.detach().requires_grad_() for x in (p, gates, b_up))
        n, r = b_up.shape[0], b_up.shape[2]
        p_n = [p if shared else p[:, i * r : (i + 1) * r] for i in range(n)]
        y = SCALING * sum(gates[:, i, None] * p_n[i] @ b_up[i].T for i in range(n))
        auto = torch.autograd.grad((y * grad_out.detach()).sum(), (p, gates, b_up))
        for a, b in zip(auto, grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
@pytest.mark.parametrize(("t", "n", "r"), [(37, 5, 8), (37, 5, 5), (1, 1, 1)])
def test_fp32(shared, t, n, r):
    check(t, n, r, 24, shared=shared)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
def test_fp16(shared):
    check(37, 5, 8, 24, shared=shared, dtype=torch.float16)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
@pytest.mark.parametrize("r", [5, 20])
def test_several_column_tiles(monkeypatch, shared, r):
    """Column tiles narrower than N·R_PAD: the shared dp is summed from per-tile partials, and
    dgates, whose experts never straddle a tile, comes straight from its tile. r = 20 pads to
    32 columns, wider than C_TILE: one expert a tile."""
    monkeypatch.setattr(KM, "C_TILE", 16)
    check(9, 3, r, 24, shared=shared, needs=(True, True, False))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
def test_db_up_token_splits(monkeypatch, shared):
    """db_up summed over several deterministic token splits (fp32 partials)."""
    monkeypatch.setattr(KM, "TOKEN_CHUNK", 16)
    assert KM._token_splits(37, 1) == 2
    check(37, 2, 4, 24, shared=shared, needs=(False, False, True))


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_needs_subsets(needs):
    check(7, 3, 4, 24, shared=True, needs=needs)


def test_empty_and_unneeded():
    p, gates, b_up, grad_out = make(0, 3, 4, 24, shared=False)
    assert K.lora_mixture_expand(p, gates, b_up, SCALING, shared=False).shape == (0, 24)
    dp, dgates, db = K.lora_mixture_expand_backward(
        p, gates, b_up, grad_out, SCALING, shared=False, needs=ALL
    )
    assert dp.shape == (0, 12) and dgates.shape == (0, 3)
    assert db.shape == (3, 24, 4) and not db.any()
    none = K.lora_mixture_expand_backward(p, gates, b_up, grad_out, SCALING, shared=False, needs=(0, 0, 0))
    assert none == (None, None, None)


def test_strided_inputs_are_read_in_place():
    """Transposed, sliced and permuted views give the same results as their contiguous copies."""
    t, n, r, d_out = 9, 3, 4, 24
    p, gates, b_up, grad_out = make(t, n, r, d_out, shared=True)
    views = (
        p.T.contiguous().T,
        torch.stack([gates, gates], 2)[..., 0],  # column stride 2
        b_up.permute(0, 2, 1).contiguous().permute(0, 2, 1),
        grad_out.T.contiguous().T,
    )
    assert not any(v.is_contiguous() for v in views)
    expect = K.lora_mixture_expand(p, gates, b_up, SCALING, shared=True)
    got = K.lora_mixture_expand(*views[:3], SCALING, shared=True)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
    for a, b in zip(  # noqa: B905
        K.lora_mixture_expand_backward(*views, SCALING, shared=True, needs=ALL),
        K.lora_mixture_expand_backward(p, gates, b_up, grad_out, SCALING, shared=True, needs=ALL),
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf·0 inside the dots
def test_an_infinite_expert_stays_in_its_own_columns():
    """An inf in expert 0's up matrix makes its G columns non-finite; the other experts' dgates
    and db_up stay finite and exact (per-expert sums never mix experts' columns)."""
    t, n, r, d_out = 5, 3, 4, 24
    p, gates, b_up, grad_out = make(t, n, r, d_out, shared=False)
    b_up[0, 3, 1] = float("inf")
    ref = reference(p, gates, b_up, grad_out, SCALING, False)
    _, dgates, db = K.lora_mixture_expand_backward(p, gates, b_up, grad_out, SCALING, shared=False, needs=ALL)
    assert not ref[2][:, 0].isfinite().all() and ref[2][:, 1:].isfinite().all()
    torch.testing.assert_close(dgates.double().cpu(), ref[2], rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(db.double().cpu(), ref[3], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- guards


def _args(shared=True, dtype=torch.float32, t=3, n=2, r=4, d_out=16):
    return make(t, n, r, d_out, shared=shared, dtype=dtype)


@pytest.mark.parametrize(
    ("which", "edit", "message"),
    [
        (0, lambda x: x[:, :3], r"p has shape \[3, 3\]; expected \[T, r=4\] with shared=True"),
        (0, lambda x: x[None], r"p must be 2-D; got shape \[1, 3, 4\]"),
        (1, lambda x: x[:2], r"gates has shape \[2, 2\]; expected \[T=3, N=2\]"),
        (2, lambda x: x[:1], r"gates has shape \[3, 2\]; expected \[T=3, N=1\]"),
        (2, lambda x: x[0], r"b_up must be 3-D; got shape \[16, 4\]"),
        (3, lambda x: x[:, :8], r"grad_out has shape \[3, 8\]; expected \[T=3, d_out=16\]"),
        (2, lambda x: x.half(), r"operands must share one dtype; got p torch.float32, b_up"),
        (
            3,
            lambda x: x.half(),
            r"share one dtype; got p torch.float32, b_up torch.float32, grad_out torch.f",
        ),
        (0, lambda x: x.double(), r"p is torch.float64; the Triton kernels.*torch"),
        (1, lambda x: x.double(), r"gates is torch.float64"),
    ],
)
def test_bad_arguments_are_named(which, edit, message):
    """Argument ``which`` (p, gates, b_up, grad_out) edited to something the kernels refuse."""
    args = _args()
    args[which] = edit(args[which])
    p, gates, b_up, grad_out = args
    with pytest.raises(ValueError, match=message):
        K.lora_mixture_expand_backward(p, gates, b_up, grad_out, SCALING, shared=True, needs=ALL)
    if "grad_out" not in message:
        with pytest.raises(ValueError, match=message):
            K.lora_mixture_expand(p, gates, b_up, SCALING, shared=True)


def test_per_expert_width_is_named():
    p, gates, b_up, _ = _args(shared=True)
    with pytest.raises(
        ValueError, match=r"p has shape \[3, 4\]; expected \[T, N·r=2·4=8\] with shared=False"
    ):
        K.lora_mixture_expand(p, gates, b_up, SCALING, shared=False)


@pytest.mark.skipif(not INTERPRETED, reason="bfloat16 is refused only under TRITON_INTERPRET=1")
def test_bfloat16_is_refused_in_the_interpreter():
    p, gates, b_up, _ = _args(dtype=torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"lora_mixture_expand: p is torch.bfloat16; .*under TRITON_INTERPRET=1"
    ):
        K.lora_mixture_expand(p, gates, b_up, SCALING, shared=True)


def test_gates_may_have_their_own_dtype():
    p, gates, b_up, grad_out = _args(dtype=torch.float16)
    ref = reference(p, gates, b_up, grad_out, SCALING, True)
    gates = gates.float()
    assert_rel(K.lora_mixture_expand(p, gates, b_up, SCALING, shared=True), ref[0], torch.float16, "out")
    _, dgates, _ = K.lora_mixture_expand_backward(p, gates, b_up, grad_out, SCALING, shared=True, needs=ALL)
    assert dgates.dtype == torch.float32
    assert_rel(dgates, ref[2], torch.float16, "dgates")


def test_other_refusals(monkeypatch):
    p, gates, b_up, grad_out = _args()
    with pytest.raises(ValueError, match=r"needs is \(dp, dgates, db_up\); got \(True, True\)"):
        K.lora_mixture_expand_backward(p, gates, b_up, grad_out, SCALING, shared=True, needs=(True, True))
    with pytest.raises(ValueError, match="scaling must be a real number; got Tensor"):
        K.lora_mixture_expand(p, gates, b_up, torch.tensor(0.5), shared=True)
    wide = torch.zeros(2, 16, KM.MAX_RANK + 1)
    with pytest.raises(
        ValueError, match=rf"r={KM.MAX_RANK + 1} .* next_pow2\(r\) <= {KM.MAX_RANK}; use the torch"
    ):
        K.lora_mixture_expand_backward(
            torch.zeros(3, KM.MAX_RANK + 1), gates, wide, grad_out, SCALING, shared=True, needs=ALL
        )
    with pytest.raises(ValueError, match="tensors must be on one device; got p on cpu, gates on meta"):
        K.lora_mixture_expand(p.cpu(), gates.to("meta"), b_up.cpu(), SCALING, shared=True)
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="need CUDA tensors .*TRITON_INTERPRET=1.*; p is on cpu"):
            K.lora_mixture_expand(p, gates, b_up, SCALING, shared=True)


def test_grad_config_pruning_keeps_staged_tiles_inside_the_budget():
    import triton

    def cfg(block_t, block_k, stages):
        return triton.Config({"BLOCK_T": block_t, "BLOCK_K": block_k}, num_warps=4, num_stages=stages)

    configs = [cfg(128, 64, 3), cfg(64, 64, 3), cfg(32, 32, 2)]
    fp32, bf16 = torch.empty(0), torch.empty(0, dtype=torch.bfloat16)
    # fp32 at BLOCK_C = 256: (128 + 256)·64·4 B·3 = 288 KB and (64 + 256)·64·4·3 = 240 KB are over
    kept = KM._prune_grad(configs, {}, go_ptr=fp32, BLOCK_C=256)
    assert [c.kwargs["BLOCK_T"] for c in kept] == [32]
    assert len(KM._prune_grad(configs, {}, go_ptr=bf16, BLOCK_C=256)) == 3
    only = KM._prune_grad(configs[:2], {}, go_ptr=fp32, BLOCK_C=4096)
    assert [c.kwargs["BLOCK_T"] for c in only] == [64]
