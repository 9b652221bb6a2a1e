#!/usr/bin/env bash
# Stages of the one GPU command (scripts/gpu_run.sh), for a rerun of part of it:
#   bash scripts/gpu_session.sh tests|bench|profile|all [--out DIR]
# bench = the suite and its report; all = gpu_run.sh (tests, bench, profile, report).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stage="${1:-all}"
shift || true
case "$stage" in
  tests) exec bash scripts/gpu_run.sh --only tests "$@" ;;
  bench) exec bash scripts/gpu_run.sh --only bench,report "$@" ;;
  profile) exec bash scripts/gpu_run.sh --only profile "$@" ;;
  all) exec bash scripts/gpu_run.sh "$@" ;;
  *) echo "usage: $0 tests|bench|profile|all [--out DIR]" >&2; exit 2 ;;
esac
