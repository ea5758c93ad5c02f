"""White-box distillation from objective.teacher, with Ray Train.

    python ray_jobs/distill.py --config recipes/minimind-26m/distill.yaml --num-workers 2
    ray job submit --working-dir . -- python ray_jobs/distill.py --config ... --storage-path s3://bucket/runs

Flags and dotted overrides: see minimind/train/launch.py or --help. Connects to RAY_ADDRESS when set,
else starts Ray locally; running the same command again resumes the run from its latest checkpoint.
"""

from minimind.train.launch import main

if __name__ == "__main__":
    main("distill")
