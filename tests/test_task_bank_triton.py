"""The vector task-bank kernels (kernels/task_bank.py) in the Triton interpreter, fp32 and fp16.

Launchers against their plain-PyTorch twins, and the op (``backend="triton"``) against the reference
backend in float64 with the flash-attn rule: error <= 3x the reference's own error in the same
dtype + atol. Small awkward shapes: d not a multiple of 16, heterogeneous ranks, T = 0, 1, 7,
banks with rows of tasks absent from the batch, per-token and per-sequence task ids.
"""

from __future__ import annotations

import pytest
import torch

from scalearn_fast.ops import scaled_adapter_sum_bank

pytest.importorskip("triton")

from scalearn_fast._kernels import load_kernels  # noqa: E402

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def sources(ranks, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    wd = [torch.randn(r, d, generator=g) * 0.3 for r in ranks]
    bd = [torch.randn(r, generator=g) * 0.1 for r in ranks]
    wu = [torch.randn(d, r, generator=g) * 0.3 for r in ranks]
    bu = [torch.randn(d, generator=g) * 0.1 for _ in ranks]
    return [[t.to(dtype) for t in part] for part in (wd, bd, wu, bu)]


def bounds_of(ranks):
    return torch.tensor([0, *torch.tensor(ranks).cumsum(0).tolist()], dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,with_rs", [(7, False), (13, True), (0, False)])
def test_launchers_match_their_twins(dtype, t, with_rs):
    k = load_kernels()
    ranks, d, num_tasks = (3, 1, 6), 40, 6
    g = torch.Generator().manual_seed(1)
    r, n = sum(ranks), len(ranks)
    bounds = bounds_of(ranks)
    pre = torch.randn(t, r, generator=g).to(dtype)
    hidden = torch.relu(pre)
    w_up = (torch.randn(d, r, generator=g) * 0.3).to(dtype)
    b_up = (torch.randn(n, d, generator=g) * 0.1).to(dtype)
    bank = (1 + 0.5 * torch.randn(num_tasks, n, d, generator=g)).to(dtype)
    tasks = torch.randint(0, 3, (t,), generator=g)  # tasks 3..5 absent
    rs = (torch.rand(t, n, generator=g) + 0.5).to(dtype) if with_rs else None
    res = torch.randn(t, d, generator=g).to(dtype)
    grad = torch.randn(t, d, generator=g).to(dtype)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}

    got = k.bank_up_projection(hidden, w_up, bounds, bank, tasks, b_up, rs, res)
    want = k.bank_up_projection_ref(hidden, w_up, bounds, bank, tasks, b_up, rs, res)
    torch.testing.assert_close(got.float(), want.float(), **tol)

    got = k.bank_grad_pre(grad, pre, w_up, bounds, max(ranks), bank, tasks, rs, "relu")
    want = k.bank_grad_pre_ref(grad, pre, w_up, bounds, max(ranks), bank, tasks, rs, "relu")
    torch.testing.assert_close(got.float(), want.float(), **tol)

    units, bias = k.bank_omega_grad(pre, grad, w_up, bounds, tasks, num_tasks, rs, "relu")
    units_ref, bias_ref = k.bank_omega_grad_ref(pre, grad, w_up, bounds, tasks, num_tasks, rs, "relu")
    torch.testing.assert_close(units, units_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias, bias_ref, rtol=1e-4, atol=1e-4)
    assert units[3:].abs().sum() == 0 and bias[3:].abs().sum() == 0  # absent tasks: exactly 0


def test_task_segments_group_rows_by_task():
    k = load_kernels()
    tasks = torch.tensor([4, 1, 4, 0, 1, 4])
    perm, slot_task, start, length = k.task_segments(tasks, 7)
    assert slot_task.tolist() == [0, 1, 4, -1, -1, -1]
    for task in (0, 1, 4):
        rows = perm[start[task] : start[task] + length[task]].tolist()
        assert rows == [i for i, x in enumerate(tasks.tolist()) if x == task]
    assert length.tolist() == [1, 2, 0, 0, 3, 0, 0]


def _leaves(z, srcs, bank, res, dtype):
    cast = lambda x: x.detach().to(dtype).requires_grad_()  # noqa: E731
    wd, bd, wu, bu = srcs
    # sources frozen except D, b_D and B (ScaLearn trains none of them; dD, db_D, dB are still tested)
    return cast(z), [[cast(x) for x in wd], [cast(x) for x in bd], [x.to(dtype) for x in wu],
                     [cast(x) for x in bu]], cast(bank), cast(res)  # fmt: skip


def _run(backend, z, srcs, bank, tasks, res, dtype, rs=None, activation="relu"):
    zc, sc, bk, rc = _leaves(z, srcs, bank, res, dtype)
    rs = None if rs is None else rs.to(dtype)
    out = scaled_adapter_sum_bank(
        zc, *sc, bk, tasks, rc, backend=backend, activation=activation, row_scale=rs
    )
    probe = torch.cos(torch.arange(out.numel(), dtype=torch.float64)).reshape(out.shape).to(dtype)
    leaves = [zc, bk, rc, *sc[0], *sc[1], *sc[3]]
    grads = torch.autograd.grad((out * probe).sum(), leaves)
    return [out.detach(), *[x.detach() for x in grads]]


CASES = [
    # rows of z, per-sequence ids, ranks, d, K, activation, row_scale
    ((7,), False, (4, 4, 4), 40, 6, "relu", False),
    ((2, 5), False, (3, 1, 6), 24, 9, "gelu", True),
    ((3, 4), True, (5, 2), 20, 7, "relu", False),
    ((1,), False, (2, 2, 2), 16, 3, "silu", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,per_seq,ranks,d,k,activation,with_rs", CASES)
def test_op_matches_reference(monkeypatch, dtype, rows, per_seq, ranks, d, k, activation, with_rs):
    """Values and the gradients of z, Ω (rows present only), D, b_D, B and the residual."""
    calls = {"up": 0, "omega": 0}
    kern = load_kernels()
    for name, key in (("bank_up_projection", "up"), ("bank_omega_grad", "omega")):
        real = getattr(kern, name)

        def spy(*a, _real=real, _key=key, **kw):
            calls[_key] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(kern, name, spy)
    g = torch.Generator().manual_seed(3)
    n = len(ranks)
    srcs = sources(ranks, d, torch.float64)
    z = torch.randn(*rows, d, generator=g, dtype=torch.float64)
    res = torch.randn(*rows, d, generator=g, dtype=torch.float64)
    bank = 1 + 0.5 * torch.randn(k, n, d, generator=g, dtype=torch.float64)
    tasks = torch.randint(0, k - 2, rows[:1] if per_seq else rows, generator=g)  # the last 2 rows absent
    rs = torch.rand(*rows, n, generator=g, dtype=torch.float64) + 0.5 if with_rs else None
    ref = _run("reference", z, srcs, bank, tasks, res, torch.float64, rs, activation)
    low = _run("reference", z, srcs, bank, tasks, res, dtype, rs, activation)
    got = _run("triton", z, srcs, bank, tasks, res, dtype, rs, activation)
    assert calls == {"up": 1, "omega": 1}  # the kernels ran, not the torch loop
    names = ["out", "z", "bank", "residual"] + [
        f"{p}[{i}]" for p in ("w_down", "b_down", "b_up") for i in range(n)
    ]
    for name, a, b, c in zip(names, got, low, ref, strict=True):
        err = (a.double() - c.double()).abs().max().item()
        base = (b.double() - c.double()).abs().max().item()
        assert err <= 3 * base + ATOL[dtype], f"{name}: err {err:.3e} > 3*{base:.3e}"
    assert got[2][k - 2 :].abs().sum() == 0  # dΩ: zero in the rows of absent tasks


def test_empty_batch_and_trained_sources_fall_back():
    """T = 0 gives empty results; a backward that wants dW_up (trained sources) still matches the
    reference (it runs the torch loop)."""
    srcs = sources((3, 2), 16, torch.float32)
    bank = torch.randn(4, 2, 16)
    empty = scaled_adapter_sum_bank(torch.zeros(0, 16), *srcs, bank, torch.zeros(0, dtype=torch.int64),
                                    backend="triton")  # fmt: skip
    assert empty.shape == (0, 16)
    z = torch.randn(5, 16)
    tasks = torch.tensor([3, 0, 3, 1, 0])
    outs = {}
    for backend in ("reference", "triton"):
        wu = [w.clone().requires_grad_() for w in srcs[2]]
        out = scaled_adapter_sum_bank(z, srcs[0], srcs[1], wu, srcs[3], bank, tasks, backend=backend)
        outs[backend] = [out, *torch.autograd.grad(out.square().sum(), wu)]
    for a, b in zip(outs["triton"], outs["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
