"""Random inputs for the fuzz suite: hypothesis draws the structure of a case (sizes, dtype, layout,
flags) and a seed; the tensors come from a seeded ``torch.Generator``, so a case is cheap to draw and
a failing one prints as a short list of choices."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import strategies as st

from tests.fuzz.harness import DTYPES, F64

BACKENDS = ("reference", "torch", "triton", "auto")
ACTS = ("relu", "relu", "relu", "gelu", "silu", "tanh", "identity")
# leading shapes of z: 1-D (no lead), T = 0, 1, 7 as [T] and as 3-D [B, S]
LEADS = ((), (0,), (1,), (7,), (2, 3), (1, 7), (0, 3), (3,))
HIDDEN = (1, 3, 5, 8, 13, 16, 17, 24)
LAYOUTS = ("contiguous", "sliced", "transposed")


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


NEEDS_INTERPRETER = pytest.mark.skipif(
    not interpreted(), reason="the fuzz runs Triton on CPU tensors, in the interpreter (TRITON_INTERPRET=1)"
)


def backend_params(backends=BACKENDS) -> list:
    """``backends`` as pytest params; ``triton`` is skipped where it cannot run on CPU tensors."""
    return [pytest.param(b, marks=NEEDS_INTERPRETER) if b == "triton" else b for b in backends]


def dtype_strategy(backend: str):
    """All four dtypes; under the Triton interpreter fp32/fp16 are the correctness cases, fp64/bf16
    are drawn less often (the right outcome there is a clear error or a correct answer)."""
    if backend == "triton" and interpreted():
        return st.sampled_from(("fp32", "fp32", "fp16", "fp16", "fp16", "fp64", "bf16"))
    return st.sampled_from(("fp32", "fp64", "fp16", "bf16"))


@dataclass
class Case:
    backend: str
    dtype: str
    ranks: tuple[int, ...]
    stacked: bool
    d: int
    lead: tuple[int, ...]
    uniform: bool
    row_scale: bool
    residual: bool
    activation: str
    layout: str
    use_fused: bool | None
    grads: tuple[str, ...]
    seed: int
    big_omega: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.ranks)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@st.composite
def op_cases(draw, backend: str, *, grads: bool = True) -> Case:
    n = draw(st.integers(1, 4))
    stacked = draw(st.booleans())
    if stacked:
        ranks = (draw(st.sampled_from((1, 2, 3, 4, 6, 0))),) * n
    else:
        ranks = tuple(draw(st.lists(st.sampled_from((1, 2, 3, 5, 7, 0)), min_size=n, max_size=n)))
    dtype = draw(dtype_strategy(backend))
    grad_set: tuple[str, ...] = ()
    if grads:
        grad_set = draw(
            st.sampled_from(
                (("z", "omega"), ("omega",), ("z",), ("z", "omega", "row_scale", "residual"), ("row_scale",),
                 ("z", "omega", "sources"), ())
            )
        )  # fmt: skip
    return Case(
        backend=backend,
        dtype=dtype,
        ranks=ranks,
        stacked=stacked,
        d=draw(st.sampled_from(HIDDEN)),
        lead=draw(st.sampled_from(LEADS)),
        uniform=draw(st.booleans()),
        row_scale=draw(st.booleans()),
        residual=draw(st.booleans()),
        activation=draw(st.sampled_from(ACTS)),
        layout=draw(st.sampled_from(LAYOUTS)),
        use_fused=draw(st.sampled_from((None, True, False))) if backend == "triton" else None,
        grads=grad_set,
        seed=draw(st.integers(0, 2**20)),
        big_omega=dtype == "fp16" and draw(st.integers(0, 7)) == 0,
    )


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a non-contiguous layout (a detached leaf; views of it are returned)."""
    if layout == "sliced" and t.dim() >= 1 and t.shape[-1] > 1:
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big.requires_grad_(t.requires_grad)[..., ::2]
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().requires_grad_(t.requires_grad).transpose(-1, -2)
    return t.clone().requires_grad_(t.requires_grad)


@dataclass
class OpInputs:
    z: torch.Tensor
    sources: list  # w_down, b_down, w_up, b_up: stacked tensors or lists
    omega: torch.Tensor
    residual: torch.Tensor | None
    row_scale: torch.Tensor | None

    def named(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor by role (source lists flattened)."""
        src = [t for s in self.sources for t in (s if isinstance(s, list) else [s])]
        out = {"z": [self.z], "omega": [self.omega], "sources": src}
        out["residual"] = [] if self.residual is None else [self.residual]
        out["row_scale"] = [] if self.row_scale is None else [self.row_scale]
        return out

    def map(self, fn) -> OpInputs:
        def one(t):
            return None if t is None else fn(t)

        src = [[fn(t) for t in s] if isinstance(s, list) else fn(s) for s in self.sources]
        return OpInputs(one(self.z), src, one(self.omega), one(self.residual), one(self.row_scale))


def make_op_inputs(case: Case) -> OpInputs:
    """Float64 master values rounded to the case's dtype (the values every party sees)."""
    g = torch.Generator().manual_seed(case.seed)
    dtype = case.torch_dtype
    d, n = case.d, case.n

    def rnd(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * std + mean).to(dtype)

    up_std = 40.0 if case.big_omega else 1.0
    wd = [rnd(r, d, std=1 / math.sqrt(d)) for r in case.ranks]
    bd = [rnd(r, std=0.1) for r in case.ranks]
    wu = [rnd(d, r, std=up_std / math.sqrt(max(r, 1))) for r in case.ranks]
    bu = [rnd(d, std=0.1) for _ in case.ranks]
    sources = [torch.stack(x) for x in (wd, bd, wu, bu)] if case.stacked else [wd, bd, wu, bu]
    omega_std, omega_mean = (1500.0, 0.0) if case.big_omega else (0.5, 2.0 / n)
    omega = rnd(n, 1 if case.uniform else d, std=omega_std, mean=omega_mean)
    z = rnd(*case.lead, d)
    residual = rnd(*case.lead, d) if case.residual else None
    row_scale = rnd(*case.lead, n, std=0.5, mean=0.5) if case.row_scale else None
    return OpInputs(z, sources, omega, residual, row_scale)


def with_grad(inputs: OpInputs, wanted: tuple[str, ...], layout: str | None = None) -> OpInputs:
    """Fresh copies (in ``layout`` when given) with requires_grad on the roles in ``wanted``."""
    named = inputs.named()
    flagged = {id(t) for role in wanted for t in named.get(role, [])}

    def fresh(t):
        leaf = t.detach().clone().requires_grad_(id(t) in flagged and t.is_floating_point())
        return leaf if layout is None else strided(leaf, layout)

    return inputs.map(fresh)


def grad_targets(inputs: OpInputs, wanted: tuple[str, ...]) -> list[tuple[str, torch.Tensor]]:
    named = inputs.named()
    return [(f"d{role}[{i}]", t) for role in wanted for i, t in enumerate(named.get(role, []))]


def probe_like(out: torch.Tensor) -> torch.Tensor:
    """A fixed, non-constant weighting of the output, so every entry's gradient differs."""
    return torch.cos(torch.arange(out.numel(), dtype=F64) * 0.7 + 0.3).reshape(out.shape).to(out.dtype)


@contextlib.contextmanager
def triton_path(use_fused: bool | None) -> Iterator[None]:
    """Force the Triton forward path (fused, two-kernel, or the default choice) for one case."""
    from scalearn_fast.ops import triton_backend

    before = triton_backend.USE_FUSED
    triton_backend.USE_FUSED = use_fused
    try:
        yield
    finally:
        triton_backend.USE_FUSED = before
