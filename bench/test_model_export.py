"""Model level, deployed: the ScaLearn encoder eager vs run from its AOTInductor package
(``scalearn_fast.export``), inference tokens/s (mode ``infer_package``)."""

from __future__ import annotations

import pytest

from scalearn_fast.bench.export import EXPORT_VARIANTS, run_export_case


def test_model_export(group_run, model_case, model_mode):
    if model_mode != "infer":  # one group per case: the package serves inference only
        pytest.skip("the package is timed once per case, in inference")
    run_export_case(group_run, model_case, list(EXPORT_VARIANTS))
