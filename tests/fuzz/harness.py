"""What every fuzz test shares: settings, the tolerance rule, the classification of a case, the
known defects that are tolerated until fixed, and the counts printed at the end of the run.

Each case ends in one of these outcomes:

- ``correct``: the result (and its gradients) match the float64 oracle within the tolerance, and
  non-finite values (NaN, ±inf) sit where the oracle has them;
- ``clear-error``: a ``ValueError`` or ``RuntimeError`` whose message names an argument;
- ``known-defect``: a silent wrong answer or unclear exception that ``KNOWN_DEFECTS`` lists (a
  defect of issue 16 not fixed yet); it is counted, and the test still passes;
- ``defect``: anything else (a silent wrong answer, an IndexError/TypeError/AttributeError or a
  Triton crash): the test fails, and hypothesis shrinks the case.

Tolerance (docs/design.md, testing rules): a result passes when
``max|out - oracle64| <= 3·max|oracle_dtype - oracle64| + ATOL[dtype]·(1 + max|oracle64|)``: at
most three times the error of the same loop run in the result's dtype, plus a small relative floor.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable

import torch
from hypothesis import HealthCheck, settings

F64 = torch.float64
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (suite, backend, outcome) -> number of cases; printed by tests/fuzz/conftest.py
COUNTS: Counter[tuple[str, str, str]] = Counter()

# Known defects of issue 16 that the fuzz finds today. Each key names one defect; the fuzz tolerates
# a case only when its predicate (``known_defect``) says it is exactly that defect, and each has a
# minimal reproducer in test_fuzz_known_defects.py marked xfail(strict=True) from this table. Once
# the core fixes one, its reproducer XPASSes (the suite turns red): delete its entry here.
KNOWN_DEFECTS: dict[str, str] = {}

# Deliberate, documented behaviour that differs from the loop (docs/design.md, "Non-finite values
# and precision"): counted as its own outcome, never as a defect; test_fuzz_known_defects.py tests
# the documented behaviour exactly.
DOCUMENTED: dict[str, str] = {
    "inf-omega-row-scale": "omega = ±inf (or row_scale = ±inf): ω is applied to W_up before the GEMM, "
    "where it meets ReLU's zeros (inf·0 = NaN), so entries the loop returns as ±inf come out NaN; "
    "non-finite exactly where the loop is non-finite",
}

_ARG_NAMES = (
    "z", "w_down", "b_down", "w_up", "b_up", "omega", "residual", "row_scale", "activation", "backend",
    "dtype", "scaling", "query_weight", "query_bias", "key_weight", "key_bias", "value_weight",
    "query_input", "temperature", "dropout_p", "hidden_states", "input_tensor", "variant", "layer_norm",
    "source_names", "omega_dropout", "dropout",
)  # fmt: skip
_ARG_RE = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, _ARG_NAMES)) + r")(?![A-Za-z0-9_])")


def fuzz_settings(examples: int):
    """Bounded and deterministic in CI; ``SCALEARN_FUZZ_EXAMPLES=n`` runs n examples per test
    instead, ``SCALEARN_FUZZ_RANDOM=1`` draws fresh examples on each run."""
    override = os.environ.get("SCALEARN_FUZZ_EXAMPLES")
    return settings(
        max_examples=int(override) if override else examples,
        deadline=None,
        derandomize=os.environ.get("SCALEARN_FUZZ_RANDOM", "0") != "1",
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=False,
    )


class Problem(str):
    """Why a result is wrong; ``kind`` is ``nonfinite`` (NaN or ±inf where the oracle has none, or
    the reverse), ``tolerance``, ``shape``, ``dtype`` or ``other``."""

    kind: str

    def __new__(cls, message: str, kind: str = "other") -> Problem:
        self = super().__new__(cls, message)
        self.kind = kind
        return self


class Defect(AssertionError):
    """A case that is neither correct nor a clear error."""


def names_an_argument(message: str) -> bool:
    return _ARG_RE.search(message) is not None


def error_outcome(exc: BaseException, extra_ok: Callable[[str], bool] | None = None) -> str | None:
    """``None`` for a clear error, else why it is not clear."""
    msg = str(exc)
    if isinstance(exc, ValueError | RuntimeError) and not isinstance(exc, NotImplementedError):
        if names_an_argument(msg) or (extra_ok is not None and extra_ok(msg)):
            return None
        return f"{type(exc).__name__} that names no argument: {msg[:300]}"
    return f"unclear exception {type(exc).__name__}: {msg[:300]}"


def compare(out: torch.Tensor, oracle64: torch.Tensor, oracle_low: torch.Tensor, what: str) -> Problem | None:
    """``None`` when ``out`` matches the oracle (see the module docstring), else the mismatch."""
    if not isinstance(out, torch.Tensor):
        return Problem(f"{what}: got {type(out).__name__}, expected a tensor")
    if tuple(out.shape) != tuple(oracle64.shape):
        return Problem(f"{what}: shape {list(out.shape)}, expected {list(oracle64.shape)}", "shape")
    if out.dtype != oracle_low.dtype:
        return Problem(f"{what}: dtype {out.dtype}, expected {oracle_low.dtype}", "dtype")
    if out.numel() == 0:
        return None
    o = out.detach().double()
    # where the float64 answer is not representable in the dtype, ±inf is the right answer
    ref = oracle64.detach().to(out.dtype).double()
    low = oracle_low.detach().double()
    # where the answer is representable but the loop in this dtype overflows on the way (e.g. two fp16
    # terms beyond 65504 that cancel), any non-finite value is as good as the loop's
    excused = ref.isfinite() & ~low.isfinite() & ~o.isfinite()
    if excused.any():
        o, ref = o.masked_fill(excused, 0.0), ref.masked_fill(excused, 0.0)
    nan_o, nan_r = o.isnan(), ref.isnan()
    if not torch.equal(nan_o, nan_r):
        return Problem(
            f"{what}: NaN at {_where(nan_o & ~nan_r)} where the oracle has none, "
            f"missing at {_where(nan_r & ~nan_o)}",
            "nonfinite",
        )
    pinf_o, pinf_r = o == float("inf"), ref == float("inf")
    ninf_o, ninf_r = o == float("-inf"), ref == float("-inf")
    if not (torch.equal(pinf_o, pinf_r) and torch.equal(ninf_o, ninf_r)):
        return Problem(
            f"{what}: ±inf differs from the oracle at {_where((pinf_o ^ pinf_r) | (ninf_o ^ ninf_r))}",
            "nonfinite",
        )
    finite = o.isfinite() & ref.isfinite() & ~excused
    if not finite.any():
        return None
    r64 = oracle64.detach().double()
    err = (o - r64)[finite].abs().max().item()
    base_mask = finite & low.isfinite()
    base = (low - r64)[base_mask].abs().max().item() if base_mask.any() else 0.0
    scale = r64[finite].abs().max().item()
    bound = 3 * base + ATOL[out.dtype] * (1.0 + scale)
    if not err <= bound:
        return Problem(
            f"{what}: max error {err:.3e} > bound {bound:.3e} (3·{base:.2e} + atol; max|oracle| {scale:.2e})",
            "tolerance",
        )
    return None


def _where(mask: torch.Tensor) -> str:
    idx = mask.nonzero()
    return f"{idx.shape[0]} entries (first {idx[0].tolist()})" if idx.shape[0] else "nowhere"


def record(suite: str, backend: str, outcome: str) -> None:
    COUNTS[(suite, backend, outcome)] += 1


def settle(
    suite: str, backend: str, problem: str | None, known: str | None, describe: str, ok: str = "correct"
) -> None:
    """Count the case (as ``ok`` when there is no problem); raise ``Defect`` for a problem that is
    not the known defect ``known`` (``None``: no known defect applies)."""
    if problem is None:
        record(suite, backend, ok)
        if os.environ.get("SCALEARN_FUZZ_VERBOSE") == "2":
            print(f"\n{ok}: {suite}[{backend}] {describe}")
        return
    if known is not None and known in DOCUMENTED:
        record(suite, backend, f"documented:{known}")
        return
    if known is not None and known in KNOWN_DEFECTS:
        record(suite, backend, f"known-defect:{known}")
        if os.environ.get("SCALEARN_FUZZ_VERBOSE") in ("1", "2"):
            print(f"\nknown defect {known}: {suite}[{backend}] {describe}: {problem}")
        return
    record(suite, backend, "defect")
    raise Defect(f"{suite}[{backend}] {describe}: {problem}")


def summary_lines() -> list[str]:
    """One line per (suite, backend): the count of each outcome."""
    table: dict[tuple[str, str], Counter[str]] = {}
    for (suite, backend, outcome), n in sorted(COUNTS.items()):
        table.setdefault((suite, backend), Counter())[outcome] += n
    lines = []
    totals: Counter[str] = Counter()
    per_backend: dict[str, Counter[str]] = {}
    for (suite, backend), c in table.items():
        totals.update(c)
        per_backend.setdefault(backend, Counter()).update(c)
        lines.append(f"{suite:<22} {backend:<9} {sum(c.values()):>5} cases: " + _fmt(c))
    for backend, c in sorted(per_backend.items()):
        lines.append(f"{'all suites':<22} {backend:<9} {sum(c.values()):>5} cases: " + _fmt(c))
    if totals:
        lines.append(f"{'total':<32} {sum(totals.values()):>5} cases: " + _fmt(totals))
    return lines


def _fmt(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
