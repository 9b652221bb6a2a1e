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

from .harness import GroupRun, StepInfo
from .matrix import ModelCase
from .model import ModelUnderTest, build_model, inference_step, run_model_group
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


def run_export_case(run: GroupRun, case: ModelCase, variants: list[str]) -> dict[str, dict[str, Any]]:
    """Every variant of ``case`` in inference (mode ``infer_package``), timed interleaved."""

    def step(variant: str, ids: torch.Tensor, labels: torch.Tensor) -> StepInfo:
        m = build_model("scalearn_fused", case, run.device)
        if variant == "scalearn_package":
            return package_step(m, ids), {"attach": "aoti_load_package(export(...))"}
        if variant != "scalearn_fused":
            raise ValueError(f"variant must be one of {EXPORT_VARIANTS}; got {variant!r}")
        return inference_step(m, ids), {"attach": "eager"}

    return run_model_group(run, case, "infer_package", variants, step)
