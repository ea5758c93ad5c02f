"""Hyperparameter sweep with Ray Tune + Optuna: one Ray Train run per trial, ASHA on trained tokens.

    python ray_jobs/tune.py --space search_spaces/pretrain.yaml --num-samples 24 --name lr-sweep
    python ray_jobs/tune.py --resume runs/lr-sweep          # finish an interrupted sweep
    ray job submit --working-dir . -- python ray_jobs/tune.py --space ... --storage-path /shared/runs

Writes report.md, report.html, plots/ and best.yaml into STORAGE_PATH/NAME. Flags: --help and
minimind/tune/launch.py. Connects to RAY_ADDRESS when set, else starts Ray locally.
"""

from minimind.tune.launch import main

if __name__ == "__main__":
    main()
