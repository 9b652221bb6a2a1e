"""Benchmark suite setup: the device, its record, the case matrix, the run's options and its
progress line.

Run: ``pytest bench/ --bench-json RUN/raw.json`` (scripts/bench.sh does this in its own run
folder and writes the report). One test is one group: every provider of one (kind, mode,
shape), timed in interleaved rounds. The matrix is the full one with CUDA, a reduced one on
CPU, and a smoke one with ``--bench-quick`` or ``SCALEARN_BENCH_QUICK=1``;
``SCALEARN_BENCH_MATRIX=cuda`` lists the CUDA matrix on any machine (``--collect-only``, the
GPU command's dry run). Groups run default shape first, then the N and T sweeps, then the rest;
``--bench-budget`` stops starting groups once that many seconds have passed.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path

import pytest
import torch

from scalearn_fast.bench.device import DeviceRecord, current_slug, device_record
from scalearn_fast.bench.harness import MODES, GroupRun
from scalearn_fast.bench.lora_mixture import mixture_cases
from scalearn_fast.bench.matrix import (
    case_rank,
    fusion_cases,
    is_default,
    model_cases,
    model_modes,
    scalearn_cases,
)
from scalearn_fast.bench.progress import Progress, group_weight
from scalearn_fast.bench.results import ResultWriter
from scalearn_fast.bench.task_bank import task_bank_cases
from scalearn_fast.bench.timing import cpu_memory_setup

_FORCED = os.environ.get("SCALEARN_BENCH_MATRIX", "")
if _FORCED not in ("", "cuda", "cpu"):
    raise ValueError(f"SCALEARN_BENCH_MATRIX must be 'cuda' or 'cpu'; got {_FORCED!r}")
CUDA = torch.cuda.is_available()
MATRIX_CUDA = CUDA if not _FORCED else _FORCED == "cuda"
KIND_ORDER = {
    "layer_case": 0,
    "fusion_case": 1,
    "mixture_case": 2,
    "model_case": 3,
    "task_bank_case": 4,
    "router_case": 5,
}
KIND = {
    "layer_case": "scalearn",
    "fusion_case": "fusion",
    "mixture_case": "lora_mixture",
    "model_case": "model",
    "task_bank_case": "task_bank",
    "router_case": "router",
}
cpu_memory_setup()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("scalearn_fast bench")
    group.addoption("--bench-quick", action="store_true", default=False, help="tiny shapes: a smoke run")
    group.addoption(
        "--bench-json",
        type=Path,
        default=None,
        help="where the run's rows go (default: bench/runs/<device>-<UTC stamp>/raw.json)",
    )
    group.addoption(
        "--bench-budget",
        type=float,
        default=0.0,
        help="seconds after which no new group starts (the rest is recorded as skipped); 0: no limit",
    )
    group.addoption(
        "--bench-providers",
        default="",
        help="comma-separated providers / model variants to run (default: all)",
    )
    group.addoption(
        "--bench-compile",
        choices=("all", "default", "none"),
        default="all",
        help="where the torch.compile provider runs: every shape, the default shape only, nowhere",
    )


def is_quick(config: pytest.Config) -> bool:
    return bool(config.getoption("--bench-quick")) or os.environ.get("SCALEARN_BENCH_QUICK", "0") == "1"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    quick = is_quick(metafunc.config)
    names = metafunc.fixturenames
    if "layer_case" in names:
        cases = scalearn_cases(MATRIX_CUDA, quick)
        metafunc.parametrize("layer_case", cases, ids=[c.id for c in cases])
    if "fusion_case" in names:
        cases = fusion_cases(MATRIX_CUDA, quick)
        metafunc.parametrize("fusion_case", cases, ids=[c.id for c in cases])
    if "mixture_case" in names:
        cases = mixture_cases(MATRIX_CUDA, quick)
        metafunc.parametrize("mixture_case", cases, ids=[c.id for c in cases])
    if "model_case" in names:
        cases = model_cases(MATRIX_CUDA, quick)
        metafunc.parametrize("model_case", cases, ids=[c.id for c in cases])
        metafunc.parametrize("model_mode", model_modes(MATRIX_CUDA))
    if "task_bank_case" in names:
        cases = task_bank_cases(MATRIX_CUDA, quick)
        metafunc.parametrize("task_bank_case", cases, ids=[c.id for c in cases])
    if "mode" in names:
        metafunc.parametrize("mode", list(MODES))


def _case_of(item: pytest.Item):
    spec = getattr(item, "callspec", None)
    if spec is None:
        return None, None
    for key in KIND_ORDER:
        if key in spec.params:
            return key, spec.params[key]
    return None, None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Default shape first, then the N sweep, the T sweep, the rest; ScaLearn before fusion
    before the model within each; the routed composition last."""

    def key(pair: tuple[int, pytest.Item]) -> tuple:
        pos, item = pair
        fixture, case = _case_of(item)
        if case is None:
            return (9, 9, pos)
        if fixture == "router_case":  # routed composition after the ScaLearn / fusion / model groups
            return (4, KIND_ORDER[fixture], pos)
        return (case_rank(case), KIND_ORDER[fixture], pos)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Progress weights of the groups that will run (after -k and the like deselected some)."""
    items = session.items
    config = session.config
    weights = []
    for item in items:
        spec = getattr(item, "callspec", None)
        mode = spec.params.get("mode", spec.params.get("model_mode", "fwd")) if spec else "fwd"
        fixture, case = _case_of(item)
        weights.append(group_weight(KIND.get(fixture or "", ""), case, mode))
    config.stash[_PROGRESS] = Progress([item.nodeid for item in items], weights)


_PROGRESS = pytest.StashKey[Progress]()
_WRITER = pytest.StashKey[ResultWriter]()


def _writer(config: pytest.Config) -> ResultWriter:
    if _WRITER not in config.stash:
        path = config.getoption("--bench-json")
        if path is None:
            stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            path = Path("bench/runs") / f"{current_slug()}-{stamp}" / "raw.json"
        config.stash[_WRITER] = ResultWriter(Path(path))
    return config.stash[_WRITER]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The progress line, and the time budget: a group that would start after it is skipped."""
    progress = item.config.stash.get(_PROGRESS, None)
    if progress is None or item.nodeid not in progress.index:
        return
    print("\n" + progress.start(item.nodeid), file=sys.stderr, flush=True)
    budget = float(item.config.getoption("--bench-budget") or 0.0)
    if budget > 0 and progress.elapsed() >= budget:
        fixture, case = _case_of(item)
        spec = item.callspec.params
        mode = spec.get("mode", spec.get("model_mode", "infer"))
        kind = KIND[fixture]
        reason = f"time budget of {budget:g} s spent before this group"
        _writer(item.config).skip(reason, kind=kind, mode=mode, case=case.id, provider="*")
        pytest.skip(reason)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    progress = item.config.stash.get(_PROGRESS, None)
    if progress is not None and item.nodeid in progress.index:
        progress.finish(item.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    writer = session.config.stash.get(_WRITER, None)
    if writer is not None and writer.path is not None:
        print(f"\n[bench] rows: {writer.path}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="session")
def record(device: torch.device) -> DeviceRecord:
    return device_record(device)


@pytest.fixture(scope="session")
def quick(request: pytest.FixtureRequest) -> bool:
    return is_quick(request.config)


@pytest.fixture(scope="session")
def writer(request: pytest.FixtureRequest) -> ResultWriter:
    return _writer(request.config)


@pytest.fixture(scope="session")
def skip_provider(request: pytest.FixtureRequest):
    """``skip(name, case) -> reason | None`` from --bench-providers and --bench-compile."""
    wanted = {p.strip() for p in str(request.config.getoption("--bench-providers")).split(",") if p.strip()}
    compile_where = request.config.getoption("--bench-compile")

    def skip(name: str, case) -> str | None:
        if wanted and name not in wanted:
            return f"not in --bench-providers {','.join(sorted(wanted))}"
        if name == "compile" and compile_where == "none":
            return "--bench-compile none"
        if name == "compile" and compile_where == "default" and not is_default(case):
            return "--bench-compile default: torch.compile runs at the default shape only"
        return None

    return skip


@pytest.fixture
def group_run(request: pytest.FixtureRequest, writer, device, record, quick, skip_provider) -> GroupRun:
    """How this test's group is timed and recorded; its ``skip`` knows the group's case."""
    _, case = _case_of(request.node)
    return GroupRun(writer, device, record, quick, skip=lambda name: skip_provider(name, case))
