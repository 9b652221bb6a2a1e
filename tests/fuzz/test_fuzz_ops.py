"""Fuzz of the public ops ``scaled_adapter_sum`` and ``adapter_fusion`` on every backend against the
independent float64 oracle (tests/fuzz/oracle.py): forward, gradients, double backward, non-finite
inputs and bad inputs. Every case is classified (tests/fuzz/harness.py); the counts print at the end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from scalearn_fast import adapter_fusion, scaled_adapter_sum
from tests.fuzz import oracle
from tests.fuzz.cases import (
    Case,
    OpInputs,
    backend_params,
    grad_targets,
    make_op_inputs,
    op_cases,
    probe_like,
    triton_path,
    with_grad,
)
from tests.fuzz.harness import F64, Problem, compare, error_outcome, fuzz_settings, settle

# numpy (the Triton interpreter) warns on the inf and NaN the cases feed it on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _call_op(case: Case, x: OpInputs) -> torch.Tensor:
    with triton_path(case.use_fused):
        return scaled_adapter_sum(
            x.z, *x.sources, x.omega, x.residual,
            activation=case.activation, backend=case.backend, row_scale=x.row_scale,
        )  # fmt: skip


def _oracle_op(case: Case, x: OpInputs, dtype: torch.dtype) -> torch.Tensor:
    return oracle.scaled_adapter_sum(
        x.z, *x.sources, x.omega, x.residual, activation=case.activation, row_scale=x.row_scale, dtype=dtype
    )


def _oracle_run(case: Case, base: OpInputs, dtype: torch.dtype, compute: torch.dtype):
    """The oracle's output and gradients (of ``(out·probe).sum()``), inputs rounded to ``dtype``
    and the loop run in ``compute``."""
    x = with_grad(base, case.grads)
    out = _oracle_op(case, x, compute)
    targets = grad_targets(x, case.grads)
    grads = []
    if targets:
        loss = (out * probe_like(out.detach().to(dtype)).to(compute)).sum()
        grads = torch.autograd.grad(loss, [t for _, t in targets], allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for (_, t), g in zip(targets, grads, strict=True)]
    return out.detach(), [g.detach() for g in grads]


def _known_wrong(case: Case, problem: Problem | None) -> str | None:
    """The known defect a wrong answer in this (finite) case is, if any."""
    if problem is None:
        return None
    if case.backend == "triton" and case.dtype in ("fp64", "bf16"):
        return "triton-interpreter-fp64-bf16"
    if case.big_omega and case.backend != "reference" and problem.kind == "nonfinite":
        return "fp16-fold-overflow"  # |ω|·|W_up| > 65504 in fp16: non-finite where the loop is finite
    return None


def _describe(case: Case) -> str:
    return repr(case)


def check_op_case(case: Case, suite: str = "scaled_adapter_sum") -> None:
    base = make_op_inputs(case)
    dtype = case.torch_dtype
    ref64, g64 = _oracle_run(case, base, dtype, F64)
    ref_low, g_low = _oracle_run(case, base, dtype, dtype)
    x = with_grad(base, case.grads, case.layout)
    try:
        out = _call_op(case, x)
    except Exception as exc:  # noqa: BLE001  (every exception is classified)
        settle(suite, case.backend, error_outcome(exc), None, _describe(case), ok="clear-error")
        return
    problem = compare(out, ref64, ref_low, "out")
    targets = grad_targets(x, case.grads)
    if problem is None and targets and out.requires_grad:
        try:
            loss = (out * probe_like(out.detach())).sum()
            grads = torch.autograd.grad(loss, [t for _, t in targets], allow_unused=True)
        except Exception as exc:  # noqa: BLE001
            settle(suite, case.backend, error_outcome(exc), None, _describe(case), ok="clear-error")
            return
        for (name, t), g, r64, rlow in zip(targets, grads, g64, g_low, strict=True):
            g = torch.zeros_like(t) if g is None else g
            problem = compare(g, r64, rlow, name)
            if problem is not None:
                break
    elif problem is None and targets and not out.requires_grad:
        problem = "the output does not require grad although inputs do"
    settle(suite, case.backend, problem, _known_wrong(case, problem), _describe(case))


@pytest.mark.parametrize("backend", backend_params())
@fuzz_settings(40)
@given(case=st.data())
def test_scaled_adapter_sum(backend, case):
    check_op_case(case.draw(op_cases(backend)))


# ------------------------------------------------------------------------------ non-finite inputs


def _nonfinite_known(
    case: Case, where: str, value: float, out: torch.Tensor, ref: torch.Tensor
) -> str | None:
    if case.backend == "reference":
        return None
    o, r = out.detach().double(), ref.double()
    new_nan = o.isnan() & ~r.isnan()
    if (where.startswith("omega") or where == "row_scale") and math.isinf(value):
        # NaN only where the loop has ±inf, everything else equal: the fold's inf·0
        if torch.equal(new_nan, new_nan & r.isinf()) and torch.equal(o.isinf(), r.isinf() & ~new_nan):
            return "inf-omega-row-scale"
    fused = case.backend == "triton" and case.use_fused is not False
    if where.startswith("z") and math.isinf(value) and fused:
        if torch.equal(o.isinf(), r.isinf() & ~new_nan) and not (r.isnan() & ~o.isnan()).any():
            return "fused-padding-nonfinite"
    return None


@st.composite
def nonfinite_cases(draw, backend: str):
    case = draw(op_cases(backend, grads=False))
    where = draw(st.sampled_from(("z", "z-row", "omega", "omega-row", "row_scale")))
    value = draw(st.sampled_from((math.inf, -math.inf, math.nan)))
    pos = draw(st.integers(0, 10**6))
    unit_omega = draw(st.booleans())  # ω = 1 makes row_scale = inf give ±inf, not NaN, in the loop
    if where == "row_scale":
        case.row_scale = True
    if math.prod(case.lead) == 0:  # a value to poison, and an output to compare
        case.lead = (3,)
    if not any(case.ranks):
        case.ranks = (2,) * case.n
    case.big_omega = False
    case.extra = dict(where=where, value=value, pos=pos, unit_omega=unit_omega)
    return case


def _poison(case: Case, x: OpInputs) -> OpInputs:
    where, value, pos = case.extra["where"], case.extra["value"], case.extra["pos"]
    if case.extra["unit_omega"]:
        x.omega = torch.ones_like(x.omega)
    if where.startswith("z") and x.z.numel():
        z = x.z.clone().reshape(-1, case.d)
        if where == "z-row":
            z[pos % z.shape[0]] = value
        else:
            z.view(-1)[pos % z.numel()] = value
        x.z = z.reshape(x.z.shape)
    elif where.startswith("omega"):
        om = x.omega.clone()
        if where == "omega-row":
            om[pos % om.shape[0]] = value
        else:
            om.view(-1)[pos % om.numel()] = value
        x.omega = om
    elif where == "row_scale" and x.row_scale is not None and x.row_scale.numel():
        rs = x.row_scale.clone()
        rs.view(-1)[pos % rs.numel()] = value
        x.row_scale = rs
    return x


@pytest.mark.parametrize("backend", backend_params())
@fuzz_settings(30)
@given(data=st.data())
def test_scaled_adapter_sum_nonfinite(backend, data):
    """±inf and NaN in z, ω or row_scale: the output has NaN and ±inf exactly where the loop has
    them (and the finite entries match)."""
    case = data.draw(nonfinite_cases(backend))
    suite = "nonfinite"
    base = _poison(case, make_op_inputs(case))
    ref64 = _oracle_op(case, base, F64)
    ref_low = _oracle_op(case, base, case.torch_dtype)
    x = with_grad(base, (), case.layout)
    try:
        with torch.no_grad():
            out = _call_op(case, x)
    except Exception as exc:  # noqa: BLE001
        settle(suite, backend, error_outcome(exc), None, _describe(case), ok="clear-error")
        return
    problem = compare(out, ref64, ref_low, "out")
    known = None
    if problem is not None and isinstance(out, torch.Tensor) and out.shape == ref64.shape:
        known = _nonfinite_known(case, case.extra["where"], case.extra["value"], out, ref64.to(out.dtype))
    settle(suite, backend, problem, known, _describe(case))


# ------------------------------------------------------------------------------ double backward


def _double_backward(case: Case, x: OpInputs, fn) -> list[torch.Tensor]:
    """``gz = grad(out.sum(), z, create_graph=True)``, then the gradients of
    ``out.sum() + gz.pow(2).sum()`` with respect to z, ω and (if present) row_scale."""
    out = fn(x)
    (gz,) = torch.autograd.grad(out.double().sum(), x.z, create_graph=True)
    total = out.double().sum() + gz.double().pow(2).sum()
    leaves = [x.z, x.omega] + ([x.row_scale] if x.row_scale is not None else [])
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]


def _double_backward_clear(msg: str) -> bool:
    low = msg.lower()
    return any(k in low for k in ("double backward", "create_graph", "twice", "second-order", "higher-order"))


@pytest.mark.parametrize("backend", backend_params())
@fuzz_settings(12)
@given(data=st.data())
def test_double_backward(backend, data):
    """A gradient penalty: correct versus the oracle, or a clear error, never a silent wrong answer."""
    case = data.draw(op_cases(backend, grads=False))
    if case.dtype in ("fp16", "bf16"):
        case.dtype = "fp32"
    case.big_omega = False
    if math.prod(case.lead) == 0:
        case.lead = (4,)
    case.grads = ("z", "omega", "row_scale")
    suite = "double_backward"
    base = make_op_inputs(case)

    def run_oracle(compute):
        x = with_grad(base, case.grads)
        return _double_backward(case, x, lambda x: _oracle_op(case, x, compute))

    g64, g_low = run_oracle(F64), run_oracle(case.torch_dtype)
    x = with_grad(base, case.grads, case.layout)
    try:
        grads = _double_backward(case, x, lambda x: _call_op(case, x))
    except Exception as exc:  # noqa: BLE001
        problem = error_outcome(exc, _double_backward_clear)
        settle(suite, backend, problem, None, _describe(case), ok="clear-error")
        return
    problem = None
    for name, g, r64, rlow in zip(("dz", "domega", "drow_scale"), grads, g64, g_low, strict=False):
        problem = compare(g.to(case.torch_dtype), r64, rlow, name)
        if problem is not None:
            break
    known = "double-backward" if backend != "reference" else None
    settle(suite, backend, problem, known, _describe(case))


# ------------------------------------------------------------------------------ bad inputs

_MUTATIONS = (
    "omega_shape", "omega_rows", "omega_dtype", "omega_1d", "omega_none", "row_scale_shape", "residual_shape",
    "z_last_dim", "z_int", "z_0d", "activation", "backend", "b_up_shape", "list_len", "w_up_rank",
    "residual_dtype", "sources_dtype",
)  # fmt: skip


def _mutate(case: Case, x: OpInputs, mutation: str) -> tuple[OpInputs, dict]:
    kw = dict(activation=case.activation, backend=case.backend)
    src = list(x.sources)
    if mutation == "omega_shape":
        x.omega = torch.zeros(case.n, case.d + 2, dtype=x.z.dtype)
    elif mutation == "omega_rows":
        x.omega = torch.zeros(case.n + 1, 1, dtype=x.z.dtype)
    elif mutation == "omega_dtype":
        x.omega = x.omega.to(torch.float64 if x.z.dtype != torch.float64 else torch.float32)
    elif mutation == "omega_1d":
        x.omega = torch.ones(case.n, dtype=x.z.dtype)
    elif mutation == "omega_none":
        x.omega = None
    elif mutation == "row_scale_shape":
        x.row_scale = torch.ones(*case.lead, case.n + 1, dtype=x.z.dtype)
    elif mutation == "residual_shape":
        x.residual = torch.zeros(*case.lead, case.d + 1, dtype=x.z.dtype)
    elif mutation == "z_last_dim":
        x.z = torch.zeros(*case.lead, case.d + 1, dtype=x.z.dtype)
    elif mutation == "z_int":
        x.z = torch.zeros(*case.lead, case.d, dtype=torch.int64)
    elif mutation == "z_0d":
        x.z = torch.tensor(1.0, dtype=x.z.dtype)
    elif mutation == "activation":
        kw["activation"] = "softmax"
    elif mutation == "backend":
        kw["backend"] = "cuda_magic"
    elif mutation == "b_up_shape":
        b_up = src[3]
        src[3] = (
            torch.zeros(case.n, case.d + 1, dtype=x.z.dtype)
            if isinstance(b_up, torch.Tensor)
            else [torch.zeros(case.d + 1, dtype=x.z.dtype) for _ in b_up]
        )
    elif mutation == "list_len":
        src = [list(s.unbind(0)) if isinstance(s, torch.Tensor) else list(s) for s in src]
        src[2] = src[2] + [src[2][0]]
    elif mutation == "w_up_rank":
        w_up = src[2]
        src[2] = (
            torch.zeros(case.n, case.d, max(case.ranks) + 1, dtype=x.z.dtype)
            if isinstance(w_up, torch.Tensor)
            else [torch.zeros(case.d, r + 1, dtype=x.z.dtype) for r in case.ranks]
        )
    elif mutation == "residual_dtype":
        other = torch.float64 if x.z.dtype != torch.float64 else torch.float32
        x.residual = torch.zeros(*case.lead, case.d, dtype=other)
    elif mutation == "sources_dtype":
        other = torch.float64 if x.z.dtype != torch.float64 else torch.float32
        src[0] = src[0].to(other) if isinstance(src[0], torch.Tensor) else [t.to(other) for t in src[0]]
    x.sources = src
    return x, kw


@pytest.mark.parametrize("backend", backend_params())
@fuzz_settings(25)
@given(data=st.data())
def test_scaled_adapter_sum_bad_input(backend, data):
    """Invalid arguments: a ValueError (or RuntimeError) naming the argument, never an answer."""
    case = data.draw(op_cases(backend, grads=False))
    if case.dtype in ("fp64", "bf16") and backend == "triton":
        case.dtype = "fp32"
    mutation = data.draw(st.sampled_from(_MUTATIONS))
    x, kw = _mutate(case, make_op_inputs(case), mutation)
    suite = "bad_input"
    try:
        with triton_path(case.use_fused):
            scaled_adapter_sum(x.z, *x.sources, x.omega, x.residual, row_scale=x.row_scale, **kw)
    except Exception as exc:  # noqa: BLE001
        known = (
            "omega-none" if mutation == "omega_none" and isinstance(exc, TypeError | AttributeError) else None
        )
        settle(suite, backend, error_outcome(exc), known, f"{mutation}: {_describe(case)}", ok="clear-error")
        return
    settle(suite, backend, f"invalid input ({mutation}) accepted without an error", None, _describe(case))


# ------------------------------------------------------------------------------ adapter_fusion


@st.composite
def fusion_cases(draw, backend: str) -> Case:
    case = draw(op_cases(backend, grads=False))
    case.big_omega = False
    case.row_scale = False
    grad_sets = (("z",), ("z", "fusion"), ("fusion",), ("z", "residual", "fusion"), ())
    case.grads = draw(st.sampled_from(grad_sets))
    training = draw(st.booleans())
    case.extra = dict(
        query=draw(st.booleans()),
        key=draw(st.booleans()),
        key_bias=draw(st.booleans()),
        value=draw(st.booleans()),
        query_input=draw(st.booleans()),
        residual_before=draw(st.booleans()),
        scaling=draw(st.sampled_from(("float", "[N]", "[N,1]", "[N,d]"))),
        temperature=draw(st.sampled_from((1.0, 2.5, 0.5))),
        training=training,
        dropout_p=draw(st.sampled_from((0.0, 0.3))) if training else 0.5,
        torch_seed=draw(st.integers(0, 1000)),
    )
    if case.extra["residual_before"]:
        case.residual = True
    return case


def _fusion_inputs(case: Case, base: OpInputs) -> dict:
    g = torch.Generator().manual_seed(case.seed + 1)
    dtype, d, n, e = case.torch_dtype, case.d, case.n, case.extra

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * std).to(dtype)

    eye = torch.eye(d, dtype=F64).to(dtype)
    w = dict(
        query_weight=rnd(d, d, std=0.5) if e["query"] else None,
        query_bias=rnd(d, std=0.1) if e["query"] else None,
        key_weight=rnd(d, d, std=0.5) if e["key"] else None,
        key_bias=rnd(d, std=0.1) if e["key"] and e["key_bias"] else None,
        value_weight=(eye + rnd(d, d, std=0.1)) if e["value"] else None,
        query_input=rnd(*case.lead, d) if e["query_input"] else None,
    )
    s = e["scaling"]
    w["scaling"] = (
        0.7
        if s == "float"
        else rnd(n, std=0.3) + 1
        if s == "[N]"
        else rnd(n, 1, std=0.3) + 1
        if s == "[N,1]"
        else rnd(n, d, std=0.3) + 1
    )
    return w


def _fusion_call(case: Case, x: OpInputs, w: dict, fn, **kw):
    e = case.extra
    return fn(
        x.z, *x.sources, w["query_weight"], w["query_bias"], w["key_weight"], w["key_bias"],
        w["value_weight"], x.residual, query_input=w["query_input"], scaling=w["scaling"],
        temperature=e["temperature"], residual_before=e["residual_before"], activation=case.activation, **kw,
    )  # fmt: skip


_FUSION_WEIGHTS = ("query_weight", "query_bias", "key_weight", "key_bias", "value_weight")


def _fusion_targets(case: Case, x: OpInputs, w: dict) -> list[tuple[str, torch.Tensor]]:
    out = [(n, t) for n, t in grad_targets(x, tuple(g for g in case.grads if g != "fusion"))]
    if "fusion" in case.grads:
        out += [(f"d{k}", w[k]) for k in _FUSION_WEIGHTS if w[k] is not None]
    return out


def _fusion_fresh(case: Case, base: OpInputs, w0: dict, layout: str | None):
    x = with_grad(base, case.grads, layout)
    w = {
        k: (v.detach().clone().requires_grad_("fusion" in case.grads and k in _FUSION_WEIGHTS))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in w0.items()
    }
    return x, w


@pytest.mark.parametrize("backend", backend_params())
@fuzz_settings(30)
@given(data=st.data())
def test_adapter_fusion(backend, data):
    """AdapterFusion (every config flag, train with score dropout and eval) against the oracle."""
    case = data.draw(fusion_cases(backend))
    suite = "adapter_fusion"
    e = case.extra
    base = make_op_inputs(case)
    w0 = _fusion_inputs(case, base)
    lead_t = math.prod(case.lead)
    mask = None
    if e["training"] and e["dropout_p"] > 0:  # the backends draw one mask over the [T, N] scores
        torch.manual_seed(e["torch_seed"])
        mask = F.dropout(torch.ones(lead_t, case.n, dtype=case.torch_dtype), e["dropout_p"], True)
        mask = mask.reshape(*case.lead, case.n)

    def run_oracle(compute):
        x, w = _fusion_fresh(case, base, w0, None)
        out = _fusion_call(case, x, w, oracle.adapter_fusion, score_mask=mask, dtype=compute)
        targets = _fusion_targets(case, x, w)
        if not targets:
            return out.detach(), []
        loss = (out * probe_like(out.detach().to(case.torch_dtype)).to(compute)).sum()
        grads = torch.autograd.grad(loss, [t for _, t in targets], allow_unused=True)
        return out.detach(), [
            torch.zeros_like(t) if g is None else g for (_, t), g in zip(targets, grads, strict=True)
        ]

    ref64, g64 = run_oracle(F64)
    ref_low, g_low = run_oracle(case.torch_dtype)
    x, w = _fusion_fresh(case, base, w0, case.layout)
    try:
        torch.manual_seed(e["torch_seed"])
        with triton_path(case.use_fused):
            out = _fusion_call(
                case, x, w, adapter_fusion, dropout_p=e["dropout_p"], training=e["training"], backend=backend
            )
    except Exception as exc:  # noqa: BLE001
        settle(suite, backend, error_outcome(exc), None, _describe(case), ok="clear-error")
        return
    problem = compare(out, ref64, ref_low, "out")
    targets = _fusion_targets(case, x, w)
    if problem is None and targets:
        try:
            with triton_path(case.use_fused):
                loss = (out * probe_like(out.detach())).sum()
                grads = torch.autograd.grad(loss, [t for _, t in targets], allow_unused=True)
        except Exception as exc:  # noqa: BLE001
            settle(suite, backend, error_outcome(exc), None, _describe(case), ok="clear-error")
            return
        for (name, t), g, r64, rlow in zip(targets, grads, g64, g_low, strict=True):
            problem = compare(torch.zeros_like(t) if g is None else g, r64, rlow, name)
            if problem is not None:
                break
    settle(suite, backend, problem, _known_wrong(case, problem), _describe(case))
