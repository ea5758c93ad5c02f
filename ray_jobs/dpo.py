"""Direct preference optimisation against the frozen --init-from model, with Ray Train.

    python ray_jobs/dpo.py --config recipes/minimind-26m/dpo.yaml --num-workers 2
    ray job submit --working-dir . -- python ray_jobs/dpo.py --config ... --storage-path s3://bucket/runs

Flags and dotted overrides: see minimind/train/launch.py or --help. Connects to RAY_ADDRESS when set,
else starts Ray locally; running the same command again resumes the run from its latest checkpoint.
"""

from minimind.train.launch import main

if __name__ == "__main__":
    main("dpo")
