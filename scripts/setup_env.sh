#!/usr/bin/env bash
# Create or reuse .venv with everything the project needs; safe to run again (it re-installs only
# when pyproject.toml changed). Sourced by run_sample.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MINIMIND_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.minimind-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
# pip warns once per package about configured-but-absent local indexes; keep real errors visible.
pip_install() { "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
      pip_install torch          # CUDA build for GPU machines
    else
      # No GPU: the CPU build. An unpinned torch would pull multi-GB CUDA wheels.
      pip_install "torch==${MINIMIND_CPU_TORCH:-2.13.0}"
    fi
  fi
  pip_install -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
