#!/usr/bin/env bash
# The main job on the bundled sample corpus: pretrain the tiny preset, SFT it, print samples.
# Re-running resumes (finished stages return at once). Output: runs/sample/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
OUT="${1:-runs/sample}"

minimind train --config recipes/tiny/pretrain.yaml --checkpoint.dir "$OUT/pretrain"
minimind generate --checkpoint "$OUT/pretrain" --temperature 0.7 --repetition-penalty 1.2 --max-new-tokens 48 --save "$OUT/pretrain_samples.json"
minimind train --config recipes/tiny/sft.yaml --checkpoint.dir "$OUT/sft" --checkpoint.init_from "$OUT/pretrain"
minimind generate --checkpoint "$OUT/sft" --chat --temperature 0.7 --repetition-penalty 1.2 --max-new-tokens 64 --save "$OUT/sft_samples.json"
echo "done: checkpoints, metrics.jsonl and samples under $OUT/"
