#!/usr/bin/env bash
# Set up (if needed) and run every test: lint, then pytest. Triton kernels run under
# TRITON_INTERPRET=1 on machines without CUDA (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
ruff check .
ruff format --check .
python -m pytest -q -rs tests "$@"    # -rs: say why anything skipped
