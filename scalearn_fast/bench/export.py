"""Model level, deployed: the ScaLearn encoder of ``bench.model`` run eagerly (``scalearn_fused``)
against the same model exported by ``scalearn_fast.export`` and run from its AOTInductor package
through ``aoti_load_package`` (``scalearn_package``), inference only, in tokens/s.

The package is compiled while the group is built (outside the timings: minutes on a CPU), for
the case's device and dtype, with a dynamic batch and length as ``export`` writes by default; its
output is checked against the eager model's before it is timed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .device import DeviceRecord
from .harness import Candidate, run_case_group
from .matrix import ModelCase
from .model import (
    ModelUnderTest,
    build_model,
    inference_step,
    model_case_cost,
    model_case_inputs,
    model_case_params,
)
from .providers import ProviderUnavailable

EXPORT_VARIANTS = ("scalearn_fused", "scalearn_package")


def package_step(m: ModelUnderTest, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The encoder exported and loaded from its package; calling it runs the package."""
    from torch._inductor import aoti_load_package

    from ..deploy import export

    eager = inference_step(m, ids)()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export(m.encoder, ids, Path(tmp) / "encoder.pt2")
            package = aoti_load_package(str(path))
        except Exception as exc:  # noqa: BLE001  (the reason goes into the report)
            raise ProviderUnavailable(f"export failed: {type(exc).__name__}: {exc}"[:300]) from exc

    def run() -> torch.Tensor:
        with torch.no_grad():
            return package(ids)[0]

    out = run()
    tol = 2e-2 if out.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(out.float(), eager.float(), rtol=tol, atol=tol):
        err = (out.float() - eager.float()).abs().max().item()
        raise ProviderUnavailable(f"the package's output differs from eager (max |diff| {err:.3g})")
    return run


def run_export_case(
    writer: Any,
    case: ModelCase,
    device: torch.device,
    record: DeviceRecord,
    quick: bool,
    variants: list[str],
    skip: Callable[[str], str | None] = lambda name: None,
) -> dict[str, dict[str, Any]]:
    """Every variant of ``case`` in inference (mode ``infer_package``), timed interleaved."""
    c = case
    ids, _ = model_case_inputs(c, device)
    params = model_case_params(c, "infer_package")
    cost = model_case_cost(c, params)

    def candidate(variant: str) -> Candidate:
        def build() -> tuple[Callable[[], Any], int]:
            m = build_model("scalearn_fused", c, device)
            if variant == "scalearn_package":
                return package_step(m, ids), 2
            if variant != "scalearn_fused":
                raise ValueError(f"variant must be one of {EXPORT_VARIANTS}; got {variant!r}")
            return inference_step(m, ids), 2

        how = "aoti_load_package(export(...))" if variant == "scalearn_package" else "eager"
        return Candidate(variant, build, extra=lambda: {"attach": how})

    return run_case_group(
        writer, c, variants, candidate, params=params, cost=cost, record=record, device=device,
        quick=quick, skip=skip,
    )  # fmt: skip
