"""scripts/transfer_study.sh runs what its knobs say: checked with a stand-in ``python`` on PATH
that records each command and writes the ``results.json`` the script looks for."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "transfer_study.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
while [[ $# -gt 0 ]]; do
  if [[ $1 == --output ]]; then mkdir -p "$2"; echo '{}' > "$2/results.json"; fi
  shift
done
cat > /dev/null  # the summary's heredoc
"""


def run_study(tmp_path: Path, **knobs: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(calls),
        "SCALEARN_FAST_GLUE_DIR": str(tmp_path),
        **knobs,
    }
    subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=env, check=True, capture_output=True)
    return calls.read_text().splitlines() if calls.exists() else []


def test_empty_targets_run_stage_one_only(tmp_path):
    calls = run_study(tmp_path, SOURCES="cola sst-2", TARGETS="")
    commands = [c.split()[2] for c in calls if c.startswith("-m scalearn_fast")]
    assert commands == ["train-adapter", "train-adapter"]
    assert all("/adapters/" in c for c in calls if c.startswith("-m scalearn_fast"))


def test_a_target_gets_every_method_per_seed_over_the_other_sources(tmp_path):
    calls = run_study(tmp_path, SOURCES="cola rte sst-2", TARGETS="rte", SEEDS="0 1")
    calls = [c for c in calls if c.startswith("-m scalearn_fast")]
    stage2 = [c for c in calls if "/adapters/" not in c.split("--output")[1].split()[0]]
    assert len(stage2) == 2 * 6  # single adapter, fusion, four ScaLearn variants; two seeds
    fusion = next(c for c in stage2 if " train-fusion " in c)
    assert "/adapters/cola" in fusion and "/adapters/sst-2" in fusion and "/adapters/rte" not in fusion
    assert "--include-target" in fusion
