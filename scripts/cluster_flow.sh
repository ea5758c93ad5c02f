#!/usr/bin/env bash
# From a corpus to a tuned, fine-tuned model on a running Ray cluster: an experiment file submitted as one
# `ray job submit`, its outputs in STORAGE (a path every node shares, or s3://bucket/prefix; docs/cluster.md).
#
#   export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265   # `ray dashboard cluster.yaml` forwards it
#   STORAGE=/mnt/shared/minimind bash scripts/cluster_flow.sh          # experiments/sample-sweep.yaml, tiny preset
#   STORAGE=s3://my-bucket/minimind EXPERIMENT=experiments/minimind2-26m.yaml bash scripts/cluster_flow.sh \
#     --set overrides.distributed.use_gpu=true pretrain.overrides.distributed.num_workers=8
#
# The default experiment prepares the sample corpora, runs a pipeline sweep (each trial pretrains, then
# fine-tunes from its weights, and is judged after SFT), trains the best trial's pretraining and SFT
# configurations again in turn, and evaluates the result. Arguments go to ray_jobs/experiment.py: --dry-run,
# --only STEP..., --force STEP..., --set KEY=VALUE... (over the file's values), --gpu-hour-usd PRICE.
# `--set overrides.distributed.use_gpu=true` puts every train step, every sweep trial (each of its stages) and
# the eval steps' scoring on GPUs; `STEP.overrides.FIELD=...` sets one step's run (its workers, say).
# Submitting it again runs only what is missing or changed; an interrupted step resumes from its checkpoints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard of the cluster, e.g. http://127.0.0.1:8265}"
: "${STORAGE:?set STORAGE to a path every node shares (e.g. /mnt/shared/minimind) or s3://bucket/prefix}"
EXPERIMENT="${EXPERIMENT:-experiments/sample-sweep.yaml}"
PYTHON="${PYTHON:-python}"
RUNTIME_ENV="${RUNTIME_ENV:-}"  # JSON for --runtime-env-json, e.g. '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}'
ray job submit --working-dir . ${RUNTIME_ENV:+--runtime-env-json "$RUNTIME_ENV"} -- \
  "$PYTHON" ray_jobs/experiment.py "$EXPERIMENT" --set "storage_path=$STORAGE" "$@"
