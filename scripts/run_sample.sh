#!/usr/bin/env bash
# The main job on the bundled sample corpus, as the experiment experiments/sample.yaml: prepare the corpora
# with Ray Data, pretrain the tiny preset and SFT it with Ray Train (one worker using both cores), evaluate
# the result over Ray, export it for transformers; then print samples of both models. Re-running runs only
# what is not done (a finished step is cached, an interrupted run resumes at its last checkpoint).
# Output: runs/experiments/sample/ (or OUT/sample/), where pretrain, sft, eval and export link to the steps'
# outputs, with index.html (the experiment's page) and experiment.json.
#   bash scripts/run_sample.sh [OUT] [--smoke]
# --smoke: the same commands with 24 steps of 8 sequences per stage and a small evaluation (the test suite runs it).
# Connects to the Ray cluster in RAY_ADDRESS when set, else starts Ray locally.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SETTINGS=()
OUT=runs/experiments
for arg in "$@"; do
  case "$arg" in
    --smoke)
      for stage in pretrain sft; do
        SETTINGS+=("$stage.overrides.optim.max_steps=24" "$stage.overrides.optim.batch_size=8"
          "$stage.overrides.logging.every_steps=4" "$stage.overrides.checkpoint.every_steps=8"
          "$stage.overrides.eval.max_examples=16" "$stage.overrides.eval.continuation_docs=2")
      done
      SETTINGS+=(eval.continuation_docs=2 eval.actors=1);;
    -*) echo "run_sample.sh: unknown option $arg (usage: run_sample.sh [OUT] [--smoke])" >&2; exit 2;;
    *) OUT="$arg";;
  esac
done
source scripts/setup_env.sh

python ray_jobs/experiment.py experiments/sample.yaml --set "storage_path=$OUT" ${SETTINGS[@]+"${SETTINGS[@]}"}
minimind generate --checkpoint "$OUT/sample/pretrain" --temperature 0.7 --repetition-penalty 1.2 --max-new-tokens 48 \
  --save "$OUT/sample/pretrain_samples.json"
minimind generate --checkpoint "$OUT/sample/sft" --chat --temperature 0.7 --repetition-penalty 1.2 \
  --max-new-tokens 64 --save "$OUT/sample/sft_samples.json"
echo "done: $OUT/sample/ holds the steps' outputs (pretrain, sft: runs with metrics.jsonl; eval; export), samples"
echo "and the experiment's page (index.html); chat with: minimind chat --checkpoint $OUT/sample/sft"
