#!/usr/bin/env bash
# Create or reuse .venv with everything the project needs; safe to run again (it re-installs only
# when pyproject.toml changed). Sourced by run_sample.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MINIMIND_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

# pip warns once per package about configured-but-absent local indexes; keep real errors visible. pip would compile
# every installed file to bytecode (~23,000 files, ~40 s on 2 cores); Python compiles, and caches, the few thousand
# that are imported when they first are.
pip_install() { "$VENV/bin/python" -m pip install --quiet --no-compile "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  # The pip that venv bundles (23.x on Python 3.11) spends most of the install resolving: it checks every file on
  # PyPI's pages against the platform one tag at a time (a dry run of this install: 57 s, and 22.5 s with pip 26.3).
  pip_install --upgrade "pip>=25.1" ||
    echo "setup_env: could not upgrade pip; installing with the one venv bundles (slower)" >&2
fi
STAMP="$VENV/.minimind-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
# The torch the project pins (minimind/cuda.py; the cluster files install the same). PyPI's build of it is for
# CUDA 13 and needs NVIDIA driver >= 580 (nvidia-smi shows the driver).
TORCH="torch==${MINIMIND_TORCH:-2.13.0}"
CPU_INDEX="${MINIMIND_CPU_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
      driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)"
      if [ "${driver%%.*}" -lt 580 ] 2>/dev/null; then
        echo "setup_env: NVIDIA driver $driver is older than 580, which $TORCH (CUDA 13) needs: update the" \
          "driver, or set MINIMIND_TORCH to a build for your driver's CUDA" >&2
      fi
      pip_install "$TORCH"       # the CUDA build, for GPU machines
    elif "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" \
        "$CPU_INDEX" 2>/dev/null && pip_install "$TORCH" --index-url "$CPU_INDEX"; then
      :                          # no GPU: PyTorch's CPU build (PyPI's would pull multi-GB CUDA wheels)
    else
      # PyTorch's index unreachable (only PyPI or a mirror is): the pinned version from the configured index.
      echo "setup_env: no CPU build from $CPU_INDEX (unreachable?); installing $TORCH from the configured index" >&2
      pip_install "$TORCH"
    fi
  fi
  # setuptools warns at every editable install that a folder named like the package may shadow it on import: here
  # that folder is the package itself (pip >= 25 shows build warnings).
  PYTHONWARNINGS="ignore:Editable installation" pip_install -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# Nothing was compiled at install (see pip_install), so let what runs in this venv cache bytecode as it imports, even
# where PYTHONDONTWRITEBYTECODE is set (as on the CI machines): else every test process, Ray worker and job compiles
# torch, Ray and the project again.
unset PYTHONDONTWRITEBYTECODE
