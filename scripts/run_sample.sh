#!/usr/bin/env bash
# The main job on the bundled sample corpus: prepare the corpora with Ray Data, pretrain the tiny
# preset and SFT it with Ray Train (one worker using both cores; add --num-workers N on a cluster),
# evaluate the result over Ray, and print samples. Re-running reuses finished work (prepared shards,
# finished runs resume at their last step). Output: runs/sample/ (or the directory given).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
OUT="${1:-runs/sample}"

minimind prepare data/sample/pretrain.jsonl --out "$OUT/data/pretrain" --seq-len 128 --val-fraction 0.02
minimind prepare data/sample/sft.jsonl data/sample/lora_identity.jsonl --out "$OUT/data/sft" --seq-len 256 \
  --val-fraction 0.02

python ray_jobs/pretrain.py --config recipes/tiny/pretrain.yaml --storage-path "$OUT" --name pretrain \
  --cpus-per-worker 2 --data.train_files "[$OUT/data/pretrain]" --eval.val_files "[$OUT/data/pretrain]"
minimind generate --checkpoint "$OUT/pretrain" --temperature 0.7 --repetition-penalty 1.2 --max-new-tokens 48 \
  --save "$OUT/pretrain_samples.json"

python ray_jobs/sft.py --config recipes/tiny/sft.yaml --storage-path "$OUT" --name sft --init-from pretrain \
  --cpus-per-worker 2 --data.train_files "[$OUT/data/sft]" --eval.val_files "[$OUT/data/sft]"
minimind generate --checkpoint "$OUT/sft" --chat --temperature 0.7 --repetition-penalty 1.2 --max-new-tokens 64 \
  --save "$OUT/sft_samples.json"
python ray_jobs/eval.py --checkpoint "$OUT/sft" --data "$OUT/data/sft" --format sft --seq-len 256 \
  --out "$OUT/eval" --max-new-tokens 48
echo "done: prepared data, runs (checkpoints, metrics.jsonl with val_* metrics), eval/ and samples under $OUT/"
