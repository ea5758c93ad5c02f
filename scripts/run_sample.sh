#!/usr/bin/env bash
# The main job on the bundled sample corpus: prepare the corpora with Ray Data, pretrain the tiny
# preset, SFT it, evaluate on the held-out split, and print samples. Re-running reuses finished
# work (prepared shards, finished stages). Output: runs/sample/ (or the directory given).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
OUT="${1:-runs/sample}"

minimind prepare data/sample/pretrain.jsonl --out "$OUT/data/pretrain" --seq-len 128 --val-fraction 0.02
minimind prepare data/sample/sft.jsonl data/sample/lora_identity.jsonl --out "$OUT/data/sft" --seq-len 256 \
  --val-fraction 0.02

minimind train --config recipes/tiny/pretrain.yaml --checkpoint.dir "$OUT/pretrain" \
  --data.train_files "[$OUT/data/pretrain]" --eval.val_files "[$OUT/data/pretrain]"
minimind generate --checkpoint "$OUT/pretrain" --temperature 0.7 --repetition-penalty 1.2 --max-new-tokens 48 \
  --save "$OUT/pretrain_samples.json"

minimind train --config recipes/tiny/sft.yaml --checkpoint.dir "$OUT/sft" --checkpoint.init_from "$OUT/pretrain" \
  --data.train_files "[$OUT/data/sft]" --eval.val_files "[$OUT/data/sft]"
minimind generate --checkpoint "$OUT/sft" --chat --temperature 0.7 --repetition-penalty 1.2 --max-new-tokens 64 \
  --save "$OUT/sft_samples.json"
echo "done: prepared data, checkpoints, metrics.jsonl (with val_* metrics) and samples under $OUT/"
