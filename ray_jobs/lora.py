"""LoRA fine-tuning: SFT that trains only low-rank adapters, saved apart from the base, with Ray Train.

    python ray_jobs/lora.py --config recipes/minimind-26m/lora.yaml --num-workers 2
    ray job submit --working-dir . -- python ray_jobs/lora.py --config ... --storage-path s3://bucket/runs

Flags and dotted overrides: see minimind/train/launch.py or --help. Connects to RAY_ADDRESS when set,
else starts Ray locally; running the same command again resumes the run from its latest checkpoint.
"""

from minimind.train.launch import main

if __name__ == "__main__":
    main("lora")
