"""scaled_adapter_sum_bank: every backend against an independent float64 loop over rows.

The oracle computes each row alone: out[t] = Σ_i Ω[k(t), i] ⊙ w[t, i]·(W_i·act(D_i·z_t + b_i) + B_i)
+ residual[t]. Fast results pass when their error is at most 3x the same oracle's error in the
same dtype plus a small atol.
"""

from __future__ import annotations

import pytest
import torch

from scalearn_fast.ops import pack_sources, scaled_adapter_sum_bank
from scalearn_fast.ops.activations import activation_fn
from scalearn_fast.ops.composition import Composition, op_schema

ATOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def make_case(rows_shape, n=3, ranks=(4, 4, 4), d=12, k=5, uniform=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    wd = [torch.randn(r, d, generator=g, dtype=dtype) * 0.3 for r in ranks[:n]]
    bd = [torch.randn(r, generator=g, dtype=dtype) * 0.1 for r in ranks[:n]]
    wu = [torch.randn(d, r, generator=g, dtype=dtype) * 0.3 for r in ranks[:n]]
    bu = [torch.randn(d, generator=g, dtype=dtype) * 0.1 for _ in ranks[:n]]
    z = torch.randn(*rows_shape, d, generator=g, dtype=dtype)
    residual = torch.randn(*rows_shape, d, generator=g, dtype=dtype)
    bank = 1 + 0.5 * torch.randn(k, n, 1 if uniform else d, generator=g, dtype=dtype)
    tasks = torch.randint(0, k, rows_shape, generator=g)
    return z, (wd, bd, wu, bu), bank, tasks, residual


def oracle(z, sources, bank, tasks, residual, activation="relu", row_scale=None):
    """Row by row, source by source, in float64 (no packing, no GEMM over rows)."""
    wd, bd, wu, bu = sources
    d = z.shape[-1]
    zr, rr, tr = z.reshape(-1, d), residual.reshape(-1, d), tasks.reshape(-1)
    wr = None if row_scale is None else row_scale.reshape(zr.shape[0], -1)
    outs = []
    for t in range(zr.shape[0]):
        acc = rr[t].clone()
        for i in range(len(wd)):
            a = wu[i] @ activation_fn(activation, wd[i] @ zr[t] + bd[i]) + bu[i]
            if wr is not None:
                a = a * wr[t, i]
            acc = acc + bank[tr[t], i] * a
        outs.append(acc)
    return torch.stack(outs).reshape(z.shape)


def leaves_of(z, sources, bank, residual, dtype, row_scale=None):
    cast = lambda t: t.detach().to(dtype).requires_grad_()  # noqa: E731
    zc, bk, res = cast(z), cast(bank), cast(residual)
    src = [[cast(t) for t in part] for part in sources]
    rs = None if row_scale is None else cast(row_scale)
    return zc, src, bk, res, rs


def run(fn, z, sources, bank, tasks, residual, dtype, row_scale=None, **kw):
    zc, src, bk, res, rs = leaves_of(z, sources, bank, residual, dtype, row_scale)
    out = fn(zc, src, bk, tasks, res, rs, **kw)
    probe = torch.cos(torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape)).to(dtype)
    leaves = [zc, bk, res, *src[0], *src[1], *src[2], *src[3]] + ([rs] if rs is not None else [])
    grads = torch.autograd.grad((out * probe).sum(), leaves)
    return out.detach(), [g.detach() for g in grads]


def fast(backend, activation="relu"):
    def call(zc, src, bk, tasks, res, rs):
        return scaled_adapter_sum_bank(
            zc, *src, bk, tasks, res, backend=backend, activation=activation, row_scale=rs
        )

    return call


def slow(activation="relu"):
    def call(zc, src, bk, tasks, res, rs):
        return oracle(zc, src, bk, tasks, res, activation, rs)

    return call


def check(got, low, ref, dtype, what):
    for name, a, b, c in zip(["out", *[f"grad{i}" for i in range(len(got[1]))]], [got[0], *got[1]],
                             [low[0], *low[1]], [ref[0], *ref[1]], strict=True):  # fmt: skip
        err = (a.double() - c.double()).abs().max().item()
        base = (b.double() - c.double()).abs().max().item()
        assert err <= 3 * base + ATOL[dtype], f"{what} {name}: err {err:.3e} > 3*{base:.3e}"


CASES = [
    # rows shape, ranks, uniform, activation, row_scale
    ((7,), (4, 4, 4), False, "relu", False),
    ((7,), (4, 4, 4), True, "relu", False),
    ((2, 5), (3, 1, 6), False, "gelu", True),
    ((2, 5), (3, 1, 6), True, "silu", True),
    ((1,), (2, 2, 2), False, "tanh", False),
]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("rows_shape,ranks,uniform,activation,with_rs", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bank_matches_row_loop(backend, rows_shape, ranks, uniform, activation, with_rs, dtype):
    z, sources, bank, tasks, residual = make_case(rows_shape, ranks=ranks, uniform=uniform)
    rs = torch.rand(*rows_shape, 3, dtype=torch.float64) + 0.5 if with_rs else None
    ref = run(slow(activation), z, sources, bank, tasks, residual, torch.float64, rs)
    low = run(slow(activation), z, sources, bank, tasks, residual, dtype, rs)
    got = run(fast(backend, activation), z, sources, bank, tasks, residual, dtype, rs)
    check(got, low, ref, dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("with_rs", [False, True])
def test_bank_triton_interpreter_fp32(uniform, with_rs):
    """fp32 in the interpreter: a uniform bank runs the kernels as a row_scale, a vector bank the
    torch loop."""
    pytest.importorskip("triton")
    z, sources, bank, tasks, residual = make_case((2, 5), ranks=(4, 2, 6), uniform=uniform, d=16)
    rs = torch.rand(2, 5, 3, dtype=torch.float64) + 0.5 if with_rs else None
    ref = run(slow(), z, sources, bank, tasks, residual, torch.float64, rs)
    low = run(slow(), z, sources, bank, tasks, residual, torch.float32, rs)
    got = run(fast("triton"), z, sources, bank, tasks, residual, torch.float32, rs)
    check(got, low, ref, torch.float32, "triton")


def test_bank_gradient_only_in_present_rows_and_sequence_ids():
    """dΩ is zero in the rows of tasks absent from the batch; per-sequence ids equal per-token ones."""
    z, sources, bank, _, residual = make_case((3, 4), k=6)
    seq_tasks = torch.tensor([4, 1, 4])
    per_token = seq_tasks[:, None].expand(3, 4)
    bk = bank.clone().requires_grad_()
    out = scaled_adapter_sum_bank(z, *sources, bk, seq_tasks, residual, backend="torch")
    out.square().sum().backward()
    absent = [0, 2, 3, 5]
    assert torch.all(bk.grad[absent] == 0) and torch.all(bk.grad[[1, 4]].abs().sum((1, 2)) > 0)
    torch.testing.assert_close(out, oracle(z, sources, bank, per_token, residual), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "ranks,with_rs,seq_tasks", [((4, 4, 4), False, [4, 1, 4]), ((3, 1, 6), True, [2, 0, 1])]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bank_per_task_route_matches_row_loop(monkeypatch, ranks, with_rs, seq_tasks, dtype):
    """Tasks with many rows each run the torch backend's per-task route (rows sorted by task, one
    folded U per task): values and gradients still match the row loop, with rows out of task
    order, equal and unequal ranks, and a row_scale."""
    from scalearn_fast.ops import bank as bank_ops

    taken = []
    real = bank_ops._per_task_output
    monkeypatch.setattr(bank_ops, "_per_task_output", lambda *a: taken.append(r := real(*a)) or r)
    z, sources, bank, _, residual = make_case((3, 2 * bank_ops.MIN_SEGMENT_ROWS), ranks=ranks, k=6)
    tasks = torch.tensor(seq_tasks)[:, None].expand(3, 2 * bank_ops.MIN_SEGMENT_ROWS)
    rs = torch.rand(*tasks.shape, 3, dtype=torch.float64) + 0.5 if with_rs else None
    ref = run(slow(), z, sources, bank, tasks, residual, torch.float64, rs)
    low = run(slow(), z, sources, bank, tasks, residual, dtype, rs)
    got = run(fast("torch"), z, sources, bank, tasks, residual, dtype, rs)
    check(got, low, ref, dtype, f"per-task route {dtype}")
    assert taken and all(r is not None for r in taken)


def test_bank_equals_single_task_call_per_task():
    """Rows of task k equal scaled_adapter_sum with ω = Ω[k] on those rows alone."""
    from scalearn_fast import scaled_adapter_sum

    z, sources, bank, tasks, residual = make_case((9,), k=3)
    out = scaled_adapter_sum_bank(z, *sources, bank, tasks, residual, backend="torch")
    for k in range(3):
        rows = tasks == k
        alone = scaled_adapter_sum(z[rows], *sources, bank[k], residual[rows], backend="torch")
        torch.testing.assert_close(out[rows], alone, rtol=0, atol=1e-12)


def test_bank_double_backward_matches_reference():
    """A gradient penalty (create_graph=True) through the bank equals the reference loop's."""
    z, sources, bank, tasks, residual = make_case((6,))
    results = []
    for backend in ("reference", "torch"):
        bk = bank.clone().requires_grad_()
        zc = z.clone().requires_grad_()
        out = scaled_adapter_sum_bank(zc, *sources, bk, tasks, residual, backend=backend)
        (gz,) = torch.autograd.grad(out.sin().sum(), zc, create_graph=True)
        (gb,) = torch.autograd.grad(gz.square().sum(), bk)
        results.append(gb)
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-12)


def test_bank_under_custom_op_and_compile():
    """The custom op carries the bank (schema generated from Composition) and passes opcheck."""
    assert "Tensor? omega_bank" in op_schema() and "Tensor? task_index" in op_schema()
    z, sources, bank, tasks, residual = make_case((5,), ranks=(2, 3, 2))
    packed = pack_sources(*sources)
    call = Composition(
        z.float(), packed.w_down.float(), packed.b_down.float(), packed.w_up.float(), packed.b_up.float(),
        packed.source_index, None, None, None, None, residual.float(), "relu", True,
        omega_bank=bank.float().requires_grad_(), task_index=tasks,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.scalearn_fast.scaled_adapter_sum.default, (*call, "torch"))
    bk = bank.clone().requires_grad_()
    out, _ = torch.ops.scalearn_fast.scaled_adapter_sum(*call._replace(omega_bank=bk, z=z, residual=residual,
        w_down=packed.w_down, b_down=packed.b_down, w_up=packed.w_up, b_up=packed.b_up), "torch")  # fmt: skip
    out.sum().backward()
    expect = bank.clone().requires_grad_()
    oracle(z, sources, expect, tasks, residual).sum().backward()
    torch.testing.assert_close(bk.grad, expect.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "bank_shape,tasks,match",
    [
        ((4, 2, 12), None, r"omega_bank has shape \[4, 2, 12\], expected \[K, N=3, d=12\]"),
        ((4, 3, 5), None, r"omega_bank has shape \[4, 3, 5\]"),
        ((4, 3), None, r"omega_bank has shape \[4, 3\]"),
        ((4, 3, 1), torch.tensor([0, 1, 4, 0, 0, 0, 0]), r"task_index holds id 4; the bank has K=4"),
        ((4, 3, 1), torch.tensor([0, -1, 0, 0, 0, 0, 0]), r"task_index holds id -1"),
        ((4, 3, 1), torch.tensor([0, 1]), r"task_index has shape \[2\], expected one id per row \[7\]"),
        ((4, 3, 1), torch.zeros(7, dtype=torch.int32), r"task_index must have dtype torch.int64"),
    ],
)
def test_bank_bad_inputs(bank_shape, tasks, match):
    z, sources, _, good, residual = make_case((7,), k=4)
    tasks = good if tasks is None else tasks
    with pytest.raises(ValueError, match=match):
        scaled_adapter_sum_bank(z, *sources, torch.ones(bank_shape, dtype=z.dtype), tasks, residual)


@pytest.mark.parametrize("uniform", [False, True])
def test_bank_with_unsorted_source_columns(uniform):
    """Units of a source need not be contiguous (a Composition built by hand): the torch backend on
    permuted units equals the reference loop on the packed order, values and every gradient
    (permuted alike)."""
    from scalearn_fast.ops import reference, torch_backend
    from scalearn_fast.ops.composition import Gradients

    z, sources, bank, tasks, residual = make_case((6,), ranks=(3, 2, 4), uniform=uniform, k=2)
    p = pack_sources(*sources)
    perm = torch.randperm(p.total_rank, generator=torch.Generator().manual_seed(4))
    row_scale = torch.rand(6, 3, dtype=z.dtype)
    sorted_call = Composition(
        z, p.w_down, p.b_down, p.w_up, p.b_up, p.source_index, None, None, None, row_scale, residual,
        "gelu", True, omega_bank=bank, task_index=tasks,
    )  # fmt: skip
    call = sorted_call._replace(
        w_down=p.w_down[perm], b_down=p.b_down[perm], w_up=p.w_up[:, perm], source_index=p.source_index[perm]
    )
    out, pre = torch_backend.forward(call)
    ref, _ = reference.forward(sorted_call)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    needs = Gradients(*[True] * 5, False, True, True)
    g = torch.randn_like(out)
    got = torch_backend.backward(call, pre, g, needs)
    want = reference.backward(sorted_call, pre, g, needs)
    want = want._replace(w_down=want.w_down[perm], b_down=want.b_down[perm], w_up=want.w_up[:, perm])
    for name in ("z", "w_down", "b_down", "w_up", "b_up", "row_scale", "omega_bank"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-9, atol=1e-11)


def test_bank_of_one_task_equals_scaled_adapter_sum():
    """K = 1, one row: the bank is plain ScaLearn."""
    from scalearn_fast import scaled_adapter_sum

    z, sources, bank, _, residual = make_case((1,), k=1)
    out = scaled_adapter_sum_bank(
        z, *sources, bank, torch.zeros(1, dtype=torch.int64), residual, backend="torch"
    )
    torch.testing.assert_close(out, scaled_adapter_sum(z, *sources, bank[0], residual, backend="torch"))


def test_bank_under_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces a bank call as the custom op (no graph break)."""
    z, sources, bank, tasks, residual = make_case((2, 5), dtype=torch.float32)
    bk = bank.clone().requires_grad_()
    fn = torch.compile(
        lambda z, b, t, r: scaled_adapter_sum_bank(z, *sources, b, t, r, backend="torch"), fullgraph=True
    )
    out = fn(z, bk, tasks, residual)
    out.sum().backward()
    ref_bank = bank.double().requires_grad_()
    ref = oracle(z.double(), [[t.double() for t in p] for p in sources], ref_bank, tasks, residual.double())
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bk.grad.double(), ref_bank.grad, rtol=1e-5, atol=1e-5)
