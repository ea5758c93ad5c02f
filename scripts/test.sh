#!/usr/bin/env bash
# The whole test suite (CPU is enough), plus the lint check. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
ruff check minimind ray_jobs benchmarks tests
ruff format --check --quiet minimind ray_jobs benchmarks tests
# The project's bytecode, written once: where PYTHONDONTWRITEBYTECODE is set (as on the CI machines) every test
# process, Ray worker and job would compile these modules again, ~0.3 CPU-seconds each.
python -m compileall -q -j 0 minimind ray_jobs tests >/dev/null
python -m pytest --durations=30 "$@"
