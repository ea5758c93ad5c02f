#!/usr/bin/env bash
# The main job on the bundled sample corpus: prepare the corpora with Ray Data, pretrain the tiny
# preset and SFT it with Ray Train (one worker using both cores; add --num-workers N on a cluster),
# evaluate the result over Ray, and print samples. Re-running reuses finished work (prepared shards,
# finished runs resume at their last step). Output: runs/sample/ (or the directory given).
#   bash scripts/run_sample.sh [OUT] [--smoke]
# --smoke: the same commands with 24 steps of 8 sequences per stage and a small evaluation (the test suite runs it).
# Connects to the Ray cluster in RAY_ADDRESS when set, else each command starts Ray locally.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=runs/sample
TRAIN=()
EVAL=()
for arg in "$@"; do
  case "$arg" in
    --smoke)
      TRAIN=(--optim.max_steps 24 --optim.batch_size 8 --logging.every_steps 4 --checkpoint.every_steps 24
        --eval.max_examples 16 --eval.continuation_docs 2)
      EVAL=(--continuation-docs 2 --actors 1);;
    -*) echo "run_sample.sh: unknown option $arg (usage: run_sample.sh [OUT] [--smoke])" >&2; exit 2;;
    *) OUT="$arg";;
  esac
done
source scripts/setup_env.sh

minimind prepare data/sample/pretrain.jsonl --out "$OUT/data/pretrain" --seq-len 128 --val-fraction 0.02
minimind prepare data/sample/sft.jsonl data/sample/lora_identity.jsonl --out "$OUT/data/sft" --seq-len 256 \
  --val-fraction 0.02

python ray_jobs/pretrain.py --config recipes/tiny/pretrain.yaml --storage-path "$OUT" --name pretrain \
  --cpus-per-worker 2 --data.train_files "[$OUT/data/pretrain]" --eval.val_files "[$OUT/data/pretrain]" \
  ${TRAIN[@]+"${TRAIN[@]}"}
minimind generate --checkpoint "$OUT/pretrain" --temperature 0.7 --repetition-penalty 1.2 --max-new-tokens 48 \
  --save "$OUT/pretrain_samples.json"

python ray_jobs/sft.py --config recipes/tiny/sft.yaml --storage-path "$OUT" --name sft --init-from pretrain \
  --cpus-per-worker 2 --data.train_files "[$OUT/data/sft]" --eval.val_files "[$OUT/data/sft]" \
  ${TRAIN[@]+"${TRAIN[@]}"}
minimind generate --checkpoint "$OUT/sft" --chat --temperature 0.7 --repetition-penalty 1.2 --max-new-tokens 64 \
  --save "$OUT/sft_samples.json"
python ray_jobs/eval.py --checkpoint "$OUT/sft" --data "$OUT/data/sft" --format sft --seq-len 256 \
  --out "$OUT/eval" --max-new-tokens 48 ${EVAL[@]+"${EVAL[@]}"}
echo "done: prepared data, runs (checkpoints, metrics.jsonl with val_* metrics), eval/ and samples under $OUT/"
