"""Model level, deployed: the ScaLearn encoder eager vs run from its AOTInductor package
(``scalearn_fast.export``), inference tokens/s (mode ``infer_package``)."""

from __future__ import annotations

import pytest

from scalearn_fast.bench.export import EXPORT_VARIANTS, run_export_case


def test_model_export(writer, model_case, model_mode, device, record, quick, skip_provider):
    if model_mode != "infer":  # one group per case: the package serves inference only
        pytest.skip("the package is timed once per case, in inference")
    run_export_case(
        writer, model_case, device, record, quick, list(EXPORT_VARIANTS),
        skip=lambda name: skip_provider(name, model_case),
    )  # fmt: skip
