"""pytest-benchmark suite setup: the device, its record, the case matrix, ``--bench-quick``.

Run: ``pytest bench/ --benchmark-only --benchmark-json=out.json`` (scripts/bench.sh does this
and writes the report). The matrix is the full one with CUDA, a reduced one on CPU, and a smoke
one with ``--bench-quick`` or ``SCALEARN_BENCH_QUICK=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

from scalearn_fast.bench.device import DeviceRecord, device_record
from scalearn_fast.bench.harness import MODES
from scalearn_fast.bench.matrix import fusion_cases, model_cases, scalearn_cases
from scalearn_fast.bench.model import MODEL_VARIANTS
from scalearn_fast.bench.providers import FUSION_PROVIDERS, SCALEARN_PROVIDERS
from scalearn_fast.bench.timing import cpu_memory_setup

CUDA = torch.cuda.is_available()
cpu_memory_setup()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-quick", action="store_true", default=False, help="tiny shapes: a smoke run of the suite"
    )


def is_quick(config: pytest.Config) -> bool:
    return bool(config.getoption("--bench-quick")) or os.environ.get("SCALEARN_BENCH_QUICK", "0") == "1"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    quick = is_quick(metafunc.config)
    names = metafunc.fixturenames
    if "layer_case" in names:
        cases = scalearn_cases(CUDA, quick)
        metafunc.parametrize("layer_case", cases, ids=[c.id for c in cases])
        metafunc.parametrize("provider", list(SCALEARN_PROVIDERS))
    if "fusion_case" in names:
        cases = fusion_cases(CUDA, quick)
        metafunc.parametrize("fusion_case", cases, ids=[c.id for c in cases])
        metafunc.parametrize("provider", list(FUSION_PROVIDERS))
    if "model_case" in names:
        cases = model_cases(CUDA, quick)
        metafunc.parametrize("model_case", cases, ids=[c.id for c in cases])
        metafunc.parametrize("variant", list(MODEL_VARIANTS))
    if "mode" in names:
        metafunc.parametrize("mode", list(MODES))
    if "model_mode" in names:
        metafunc.parametrize("model_mode", ["infer", "train"])


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="session")
def record(device: torch.device) -> DeviceRecord:
    return device_record(device)


@pytest.fixture(scope="session")
def quick(request: pytest.FixtureRequest) -> bool:
    return is_quick(request.config)
