"""Fuzz of the public layers ``ScaLearnLayer`` (all four variants) and ``AdapterFusionLayer`` on every
backend, in training (dropout drawn under a fixed seed, gradients) and in eval (the folded, cached
path; the cache after an in-place update; the unfolded path when an input needs grad), against the
independent float64 oracle (tests/fuzz/oracle.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from scalearn_fast import VARIANTS, AdapterFusionLayer, ScaLearnLayer
from tests.fuzz import oracle
from tests.fuzz.cases import Case, backend_params, make_op_inputs, op_cases, probe_like, triton_path
from tests.fuzz.harness import F64, Problem, compare, error_outcome, fuzz_settings, settle

# numpy (the Triton interpreter) warns on the inf and NaN the cases feed it on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _known_wrong(case: Case, problem: Problem | None) -> str | None:
    if problem is not None and case.backend == "triton" and case.dtype in ("fp64", "bf16"):
        return "triton-interpreter-fp64-bf16"
    return None


def _no_degenerate_layer_norm(case: Case) -> Case:
    """d >= 5 for the layers: at d = 1 a LayerNorm's output is its bias and every gradient through it
    is rounding noise times 1/sqrt(eps); at d = 3 the spread over three features is often tiny and
    fp16 rounding is amplified ~50x, so a fair error bound is not 3x the loop's (lucky) error. The
    ops' fuzz covers d = 1 and 3."""
    if case.d < 5:
        case.d = 5
    return case


def _layer_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, nn.LayerNorm]:
    g = torch.Generator().manual_seed(case.seed + 7)
    dtype, d = case.torch_dtype, case.d
    lead = case.lead  # () is a single token [d]
    h = (torch.randn(*lead, d, generator=g, dtype=F64)).to(dtype)
    x = (torch.randn(*lead, d, generator=g, dtype=F64)).to(dtype)
    ln = nn.LayerNorm(d, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.2 * torch.randn(d, generator=g, dtype=F64))
        ln.bias.copy_(0.1 * torch.randn(d, generator=g, dtype=F64))
    return h, x, ln


def _compare_all(outs, refs64, refs_low, names) -> Problem | None:
    for out, r64, rlow, name in zip(outs, refs64, refs_low, names, strict=True):
        problem = compare(out, r64, rlow, name)
        if problem is not None:
            return problem
    return None


def _grads(loss_of, leaves):
    grads = torch.autograd.grad(loss_of(), leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]


# ------------------------------------------------------------------------------ ScaLearnLayer


@st.composite
def scalearn_cases(draw, backend: str) -> Case:
    case = _no_degenerate_layer_norm(draw(op_cases(backend, grads=False)))
    case.big_omega = False
    case.extra = dict(
        variant=draw(st.sampled_from(VARIANTS)),
        mode=draw(st.sampled_from(("train", "eval", "eval-grad", "eval-update"))),
        omega_dropout=draw(st.sampled_from((None, 0.0, 0.5))),
        torch_seed=draw(st.integers(0, 1000)),
    )
    return case


def _scalearn_oracle(case, sources, omega, masks, h, x, h2, ln, compute):
    """Two layers sharing ``omega`` (the ``++`` variants) or each its own copy: ``y1 = L1(h, x)``,
    ``y2 = L2(h2, y1)``; ``masks``: the ω dropout masks the two layers draw, in order."""
    ys = []
    inp = (h, x)
    for mask, om in zip(masks, omega, strict=True):
        hh, xx = inp
        pre_ln = hh.to(compute) + xx.to(compute)
        z = oracle.layer_norm(pre_ln, ln, compute)
        eff = om.to(compute) if mask is None else om.to(compute) * mask.to(compute)
        composed = oracle.scaled_adapter_sum(
            z, *sources, eff, pre_ln, activation=case.activation, dtype=compute
        )
        y = oracle.layer_norm(composed, ln, compute)
        ys.append(y)
        inp = (h2, y)
    return ys


@pytest.mark.parametrize("backend", backend_params())
@fuzz_settings(20)
@given(data=st.data())
def test_scalearn_layer(backend, data):
    check_scalearn_case(data.draw(scalearn_cases(backend)))


def check_scalearn_case(case: Case) -> None:
    backend = case.backend
    e = case.extra
    suite = "ScaLearnLayer"
    variant, mode = e["variant"], e["mode"]
    dtype = case.torch_dtype
    base = make_op_inputs(case)
    h, x, ln = _layer_inputs(case)
    h2 = torch.roll(h, 1, dims=-1)
    shared = variant.endswith("++")
    cols = 1 if "uniform" in variant else case.d
    g = torch.Generator().manual_seed(case.seed + 3)
    om_vals = [(torch.randn(case.n, cols, generator=g, dtype=F64) * 0.5 + 2 / case.n).to(dtype) for _ in "ab"]
    if shared:
        om_vals[1] = om_vals[0]
    try:
        omegas = [nn.Parameter(v.clone()) for v in om_vals]
        if shared:
            omegas[1] = omegas[0]
        layers = [
            ScaLearnLayer(
                *base.sources,
                variant=variant,
                omega=om,
                activation=case.activation,
                omega_dropout=e["omega_dropout"],
                backend=backend,
                layer_norm=ln,
            )  # fmt: skip
            for om in omegas
        ]
    except Exception as exc:  # noqa: BLE001
        settle(suite, backend, error_outcome(exc), None, repr(case), ok="clear-error")
        return
    training = mode == "train"
    for layer in layers:
        layer.train(training)
    p = layers[0].omega_dropout
    masks = [None, None]
    if training:
        torch.manual_seed(e["torch_seed"])
        masks = [F.dropout(torch.ones_like(om_vals[i]), p, True) for i in (0, 1)]

    hv, xv = h.clone(), x.clone()
    want_grad = mode in ("train", "eval-grad")
    if want_grad:
        hv.requires_grad_()

    def run_layers():
        with triton_path(case.use_fused):
            y1 = layers[0](hv, xv)
            return y1, layers[1](h2, y1)

    try:
        if mode == "eval-update":  # a cached fold must follow an in-place change of ω
            with torch.no_grad():
                run_layers()
                for om in {id(o): o for o in omegas}.values():
                    om.mul_(1.5)
            om_vals = [o.detach().clone() for o in omegas]
        torch.manual_seed(e["torch_seed"])
        if want_grad:
            outs = run_layers()
        else:
            with torch.no_grad():
                outs = run_layers()
    except Exception as exc:  # noqa: BLE001
        settle(suite, backend, error_outcome(exc), None, repr(case), ok="clear-error")
        return

    def run_oracle(compute):
        oms = [om_vals[0].clone().requires_grad_(), om_vals[1].clone().requires_grad_()]
        if shared:
            oms[1] = oms[0]
        hh = h.clone().requires_grad_()
        ys = _scalearn_oracle(case, base.sources, oms, masks, hh, x, h2, ln, compute)
        if not want_grad:
            return [y.detach() for y in ys], []
        leaves = [hh, oms[0]] + ([] if shared else [oms[1]])
        probe = probe_like(ys[1].detach().to(dtype)).to(compute)
        return [y.detach() for y in ys], _grads(lambda: (ys[1] * probe).sum(), leaves)

    ref64, g64 = run_oracle(F64)
    ref_low, g_low = run_oracle(dtype)
    problem = _compare_all(outs, ref64, ref_low, ("y1", "y2"))
    if problem is None and want_grad:
        leaves = [hv, omegas[0]] + ([] if shared else [omegas[1]])
        try:
            with triton_path(case.use_fused):
                grads = _grads(lambda: (outs[1] * probe_like(outs[1].detach())).sum(), leaves)
        except Exception as exc:  # noqa: BLE001
            settle(suite, backend, error_outcome(exc), None, repr(case), ok="clear-error")
            return
        problem = _compare_all(grads, g64, g_low, ("dh", "domega[0]", "domega[1]")[: len(leaves)])
    settle(suite, backend, problem, _known_wrong(case, problem), repr(case))


# ------------------------------------------------------------------------------ AdapterFusionLayer


@st.composite
def fusion_layer_cases(draw, backend: str) -> Case:
    case = _no_degenerate_layer_norm(draw(op_cases(backend, grads=False)))
    case.big_omega = False
    case.extra = dict(
        query=draw(st.booleans()),
        key=draw(st.booleans()),
        value=draw(st.booleans()),
        value_initialized=draw(st.booleans()),
        temperature=draw(st.booleans()),
        dropout=draw(st.sampled_from((0.0, 0.1, 0.4))),
        residual_before=draw(st.booleans()),
        query_before_ln=draw(st.booleans()),
        scaling=draw(st.sampled_from((1.0, 0.5, "tensor"))),
        mode=draw(st.sampled_from(("train", "eval", "eval-grad", "eval-update"))),
        torch_seed=draw(st.integers(0, 1000)),
    )
    return case


@pytest.mark.parametrize("backend", backend_params())
@fuzz_settings(20)
@given(data=st.data())
def test_adapter_fusion_layer(backend, data):
    check_fusion_layer_case(data.draw(fusion_layer_cases(backend)))


def check_fusion_layer_case(case: Case) -> None:
    backend = case.backend
    e = case.extra
    suite = "AdapterFusionLayer"
    dtype = case.torch_dtype
    base = make_op_inputs(case)
    h, x, ln = _layer_inputs(case)
    g = torch.Generator().manual_seed(case.seed + 5)
    scaling = e["scaling"]
    if scaling == "tensor":
        scaling = (torch.rand(case.n, generator=g, dtype=F64) + 0.5).to(dtype)
    try:
        layer = AdapterFusionLayer(
            *base.sources, query=e["query"], key=e["key"], value=e["value"],
            value_initialized=e["value_initialized"], temperature=e["temperature"], dropout=e["dropout"],
            residual_before=e["residual_before"], query_before_ln=e["query_before_ln"], scaling=scaling,
            activation=case.activation, backend=backend, layer_norm=ln,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        settle(suite, backend, error_outcome(exc), None, repr(case), ok="clear-error")
        return
    with torch.no_grad():  # scores far from uniform (the library's N(0, 0.02) start is nearly flat)
        for m in (layer.query, layer.key):
            if m is not None:
                m.weight.copy_(torch.randn(case.d, case.d, generator=g, dtype=F64) * 0.6)
                m.bias.copy_(torch.randn(case.d, generator=g, dtype=F64) * 0.1)
    mode = e["mode"]
    training = mode == "train"
    layer.train(training)
    want_grad = mode in ("train", "eval-grad")
    hv = h.clone().requires_grad_(want_grad)

    def run_layer():
        with triton_path(case.use_fused):
            return layer(hv, x)

    try:
        if mode == "eval-update":  # the cached fold must follow an in-place change of a weight
            with torch.no_grad():
                run_layer()
                target = layer.value.weight if layer.value is not None else layer.w_up
                target.mul_(1.25)
        temperature = layer.T
        torch.manual_seed(e["torch_seed"])
        if want_grad:
            out = run_layer()
        else:
            with torch.no_grad():
                out = run_layer()
    except Exception as exc:  # noqa: BLE001
        settle(suite, backend, error_outcome(exc), None, repr(case), ok="clear-error")
        return
    lead_t = math.prod(h.shape[:-1])
    mask = None
    if training and e["dropout"] > 0:
        torch.manual_seed(e["torch_seed"])
        mask = F.dropout(torch.ones(lead_t, case.n, dtype=dtype), e["dropout"], True)
        mask = mask.reshape(*h.shape[:-1], case.n)
    weights = {
        "query_weight": None if layer.query is None else layer.query.weight.detach(),
        "query_bias": None if layer.query is None else layer.query.bias.detach(),
        "key_weight": None if layer.key is None else layer.key.weight.detach(),
        "key_bias": None if layer.key is None else layer.key.bias.detach(),
        "value_weight": None if layer.value is None else layer.value.weight.detach(),
    }
    sources = [layer.w_down.detach(), layer.b_down.detach(), layer.w_up.detach(), layer.b_up.detach()]
    src_lists = _unpack(sources, layer.ranks)

    def run_oracle(compute):
        hh = h.clone().requires_grad_()
        ws = {k: None if v is None else v.clone().requires_grad_() for k, v in weights.items()}
        pre_ln = hh.to(compute) + x.to(compute)
        z = oracle.layer_norm(pre_ln, ln, compute)
        common = dict(
            query_input=hh if e["query_before_ln"] else None, scaling=scaling, temperature=temperature,
            score_mask=mask, residual_before=e["residual_before"], activation=case.activation, dtype=compute,
        )  # fmt: skip
        if e["residual_before"]:
            fused = oracle.adapter_fusion(z, *src_lists, *ws.values(), hh, **common)
            y = oracle.layer_norm(fused + x.to(compute), ln, compute)
        else:
            fused = oracle.adapter_fusion(z, *src_lists, *ws.values(), pre_ln, **common)
            y = oracle.layer_norm(fused, ln, compute)
        if not want_grad:
            return y.detach(), []
        leaves = [hh] + [ws[k] for k in ("query_weight", "key_weight", "value_weight") if ws[k] is not None]
        probe = probe_like(y.detach().to(dtype)).to(compute)
        return y.detach(), _grads(lambda: (y * probe).sum(), leaves)

    ref64, g64 = run_oracle(F64)
    ref_low, g_low = run_oracle(dtype)
    problem = compare(out, ref64, ref_low, "y")
    if problem is None and want_grad:
        leaves = [hv] + [m.weight for m in (layer.query, layer.key, layer.value) if m is not None]
        names = ["dh"] + [f"d{n}.weight" for n in ("query", "key", "value") if getattr(layer, n) is not None]
        try:
            with triton_path(case.use_fused):
                grads = _grads(lambda: (out * probe_like(out.detach())).sum(), leaves)
        except Exception as exc:  # noqa: BLE001
            settle(suite, backend, error_outcome(exc), None, repr(case), ok="clear-error")
            return
        problem = _compare_all(grads, g64, g_low, names)
    settle(suite, backend, problem, _known_wrong(case, problem), repr(case))


def _unpack(packed: list[torch.Tensor], ranks: tuple[int, ...]) -> list[list[torch.Tensor]]:
    """The layer's packed ``[R, d]``, ``[R]``, ``[d, R]``, ``[N, d]`` back to per-source lists."""
    w_down, b_down, w_up, b_up = packed
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    return [
        [w_down[s : s + r] for s, r in zip(starts, ranks, strict=True)],
        [b_down[s : s + r] for s, r in zip(starts, ranks, strict=True)],
        [w_up[:, s : s + r] for s, r in zip(starts, ranks, strict=True)],
        list(b_up.unbind(0)),
    ]
