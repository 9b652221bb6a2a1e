"""The native part: CMakeLists.txt builds ``scalearn-run`` and its ctest against this torch's
libtorch (once per test process, into build/native-tests-<torch>), and ``scalearn-run`` reproduces the
eager model's outputs from the packages of tests/export_cases.py, at two batch sizes and two
sequence lengths."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

import export_cases as cases  # noqa: E402

if cases.cmake() is None or not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
    pytest.skip("the native build needs cmake and a C++17 compiler", allow_module_level=True)


@pytest.fixture(scope="session")
def build():
    return cases.native_build()


@pytest.fixture(scope="session")
def packages(tmp_path_factory) -> dict[str, cases.Case]:
    tmp = tmp_path_factory.mktemp("export")
    return {"scalearn": cases.scalearn_case(tmp), "fusion": cases.fusion_case(tmp)}


def _run(build, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(build / "scalearn-run"), *args], capture_output=True, text=True, timeout=300)


def test_ctest_passes(build):
    ctest = shutil.which("ctest") or str(cases.cmake()).replace("cmake", "ctest")
    done = subprocess.run(
        [ctest, "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("kind", ["scalearn", "fusion"])
def test_runner_matches_eager(build, packages, kind, tmp_path):
    case = packages[kind]
    for batch, seq in cases.SHAPES:
        ids, mask = cases.inputs(batch, seq)
        np.save(tmp_path / "ids.npy", ids.numpy())
        np.save(tmp_path / "mask.npy", mask.numpy().astype(np.int32))  # any integer dtype
        out = tmp_path / f"out_{batch}_{seq}"
        done = _run(
            build,
            str(case.package),
            str(tmp_path / "ids.npy"),
            str(out),
            "--attention-mask",
            str(tmp_path / "mask.npy"),
        )
        assert done.returncode == 0, done.stderr
        assert f"logits [{batch}, 2]" in done.stdout
        logits = torch.from_numpy(np.load(out / "logits.npy"))
        torch.testing.assert_close(logits, cases.eager_logits(case.model, ids, mask), rtol=1e-5, atol=1e-5)
    # no mask: all ones, as the model's default
    ids = torch.from_numpy(np.load(tmp_path / "ids.npy"))
    done = _run(build, str(case.package), str(tmp_path / "ids.npy"), str(tmp_path / "nomask"))
    assert done.returncode == 0, done.stderr
    expect = cases.eager_logits(case.model, ids, torch.ones_like(ids))
    torch.testing.assert_close(
        torch.from_numpy(np.load(tmp_path / "nomask" / "logits.npy")), expect, rtol=1e-5, atol=1e-5
    )


def test_runner_errors(build, packages, tmp_path):
    package = str(packages["scalearn"].package)
    np.save(tmp_path / "floats.npy", np.zeros((2, 3), dtype=np.float32))
    done = _run(build, package, str(tmp_path / "floats.npy"), str(tmp_path / "out"))
    assert done.returncode == 1 and "token ids must be integers" in done.stderr
    np.save(tmp_path / "ids.npy", np.zeros((2, 3), dtype=np.int64))
    np.save(tmp_path / "mask.npy", np.ones((2, 4), dtype=np.int64))
    done = _run(
        build,
        package,
        str(tmp_path / "ids.npy"),
        str(tmp_path / "out"),
        "--attention-mask",
        str(tmp_path / "mask.npy"),
    )
    assert done.returncode == 1 and "attention_mask has shape" in done.stderr
    done = _run(build, package, str(tmp_path / "ids.npy"))
    assert done.returncode == 2 and "usage" in done.stderr
