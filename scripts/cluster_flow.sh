#!/usr/bin/env bash
# From a corpus to a tuned, fine-tuned model on a running Ray cluster: every stage is a `ray job submit`.
#
#   export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265   # `ray dashboard cluster.yaml` forwards it
#   STORAGE=/mnt/shared/minimind bash scripts/cluster_flow.sh          # the bundled sample corpus, tiny preset
#   STORAGE=/mnt/shared/minimind DATA=/mnt/shared/pretrain_hq.jsonl SFT_DATA=/mnt/shared/sft_512.jsonl \
#     SEQ_LEN=512 RECIPE=recipes/minimind-26m/pretrain.yaml SPACE=search_spaces/pipeline.yaml TRIALS=16 \
#     WORKERS=8 USE_GPU=1 BEST_FLAGS="--optim.max_steps 20000" bash scripts/cluster_flow.sh
#
# Stages (all by default, or those named as arguments, in this order):
#   prepare   jsonl -> validated, tokenized Parquet shards: STORAGE/prepared/{pretrain,sft}
#   pretrain  RECIPE on the prepared corpus with WORKERS workers: STORAGE/runs/pretrain
#   sweep     SPACE with TRIALS trials (a pipeline space also fine-tunes each trial): STORAGE/sweeps/sweep
#   report    report.md, report.html, plots, best.yaml (and best-sft.yaml) in the sweep directory
#   best      best.yaml trained again (BEST_FLAGS, e.g. more steps): STORAGE/runs/sweep-best
#   sft       best-sft.yaml from those weights: STORAGE/runs/sweep-best-sft
# STORAGE is object storage (s3://bucket/prefix; DATA may be there too) or a path every node shares (NFS, or
# this machine for a local cluster). Re-running a stage reuses finished work: prepare skips an up-to-date
# corpus, a finished run or sweep is not trained again, and an interrupted one resumes where it stopped
# (docs/cluster.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard of the cluster, e.g. http://127.0.0.1:8265}"
: "${STORAGE:?set STORAGE to a path every node shares (e.g. /mnt/shared/minimind) or s3://bucket/prefix}"
DATA="${DATA:-data/sample/pretrain.jsonl}"
SFT_DATA="${SFT_DATA-data/sample/sft.jsonl}"   # empty: no SFT corpus (a sweep without SFT stages)
SEQ_LEN="${SEQ_LEN:-128}"
RECIPE="${RECIPE:-recipes/tiny/pretrain.yaml}"
SPACE="${SPACE:-search_spaces/tiny_pipeline.yaml}"
TRIALS="${TRIALS:-2}"
WORKERS="${WORKERS:-2}"
USE_GPU="${USE_GPU:-}"              # 1: every stage on GPUs (the runs, the sweep's trials and their later stages)
TRIAL_WORKERS="${TRIAL_WORKERS:-1}" # workers per sweep trial (small models: one each, as many trials at once)
TRAIN_FLAGS="${TRAIN_FLAGS:-}"      # more run flags, e.g. --strategy deepspeed --zero-stage 2
SWEEP_FLAGS="${SWEEP_FLAGS:-}"      # more sweep flags, e.g. --max-concurrent 4 --distributed.gpus_per_worker 0.5
BEST_FLAGS="${BEST_FLAGS:-}"
PYTHON="${PYTHON:-python}"
RUNTIME_ENV="${RUNTIME_ENV:-}"      # JSON for --runtime-env-json, e.g. '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}'
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(prepare pretrain sweep report best sft)

submit() { ray job submit --working-dir . ${RUNTIME_ENV:+--runtime-env-json "$RUNTIME_ENV"} -- "$PYTHON" "$@"; }
prepared="$STORAGE/prepared"
sweep="$STORAGE/sweeps/sweep"
gpu_run=(); gpu_trial=()
if [ -n "$USE_GPU" ]; then gpu_run=(--use-gpu); gpu_trial=(--distributed.use_gpu true); fi
trial=(--distributed.num_workers "$TRIAL_WORKERS" "${gpu_trial[@]}")
if grep -q "^then:" "$SPACE"; then  # a pipeline space fine-tunes each trial on the prepared SFT corpus, alike
  trial+=(--sft/data.train_files "[$prepared/sft]" --sft/eval.val_files "[$prepared/sft]"
          --sft/distributed.num_workers "$TRIAL_WORKERS")
  if [ -n "$USE_GPU" ]; then trial+=(--sft/distributed.use_gpu true); fi
fi
# shellcheck disable=SC2086  # TRAIN_FLAGS, BEST_FLAGS and SWEEP_FLAGS hold several flags
for stage in "${STAGES[@]}"; do
  echo "== $stage ($(date +%T))"
  case "$stage" in
    prepare)
      submit ray_jobs/prepare.py "$DATA" --out "$prepared/pretrain" --seq-len "$SEQ_LEN" --val-fraction 0.02
      if [ -n "$SFT_DATA" ]; then
        submit ray_jobs/prepare.py "$SFT_DATA" --out "$prepared/sft" --seq-len "$((SEQ_LEN * 2))" --val-fraction 0.02
      fi ;;
    pretrain)
      submit ray_jobs/pretrain.py --config "$RECIPE" --num-workers "$WORKERS" "${gpu_run[@]}" $TRAIN_FLAGS \
        --storage-path "$STORAGE/runs" --name pretrain \
        --data.train_files "[$prepared/pretrain]" --eval.val_files "[$prepared/pretrain]" ;;
    sweep)
      submit ray_jobs/tune.py --space "$SPACE" --num-samples "$TRIALS" --storage-path "$STORAGE/sweeps" --name sweep \
        --data.train_files "[$prepared/pretrain]" --eval.val_files "[$prepared/pretrain]" "${trial[@]}" $SWEEP_FLAGS ;;
    report)
      submit ray_jobs/report.py "$sweep" ;;
    best)
      submit ray_jobs/pretrain.py --config "$sweep/best.yaml" --num-workers "$WORKERS" "${gpu_run[@]}" $TRAIN_FLAGS $BEST_FLAGS \
        --storage-path "$STORAGE/runs" ;;
    sft)
      submit ray_jobs/sft.py --config "$sweep/best-sft.yaml" --num-workers "$WORKERS" "${gpu_run[@]}" $TRAIN_FLAGS \
        --storage-path "$STORAGE/runs" --init-from sweep-best ;;
    *) echo "unknown stage $stage (prepare pretrain sweep report best sft)" >&2; exit 2 ;;
  esac
done
echo "done: the report is $sweep/report.md; runs are under $STORAGE/runs/"
