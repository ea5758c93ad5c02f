#!/usr/bin/env bash
# The whole test suite (CPU is enough), plus the lint check. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
ruff check minimind ray_jobs benchmarks tests
ruff format --check --quiet minimind ray_jobs benchmarks tests
python -m pytest --durations=30 "$@"
