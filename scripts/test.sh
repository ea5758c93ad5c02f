#!/usr/bin/env bash
# The whole test suite (CPU is enough), plus the lint check. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
ruff check minimind ray_jobs benchmarks tests
ruff format --check --quiet minimind ray_jobs benchmarks tests
# Python caches bytecode as it imports, unless PYTHONDONTWRITEBYTECODE is set (as on the CI machines): then every
# test process, Ray worker and job compiles each module it imports again (~0.3 CPU-seconds for the project alone).
# The venv and this checkout are this script's own, so let it cache.
unset PYTHONDONTWRITEBYTECODE
python -m pytest --durations=30 "$@"
