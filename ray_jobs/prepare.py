"""Shard, validate, tokenize and pack MiniMind jsonl corpora into Parquet with Ray Data.

    python ray_jobs/prepare.py data/sample/pretrain.jsonl --out data/prepared/pretrain --seq-len 512
    ray job submit --working-dir . -- python ray_jobs/prepare.py 's3://bucket/pretrain_hq.jsonl' --out ...

Connects to RAY_ADDRESS when set, else starts Ray locally. Rejected rows go to OUT/rejects/ with
their file, line and reason; counts are in OUT/manifest.json and the summary printed at the end.
"""

import argparse

from minimind.data.pipeline.cli import add_prepare_arguments, run_prepare

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prepare_arguments(parser)
    run_prepare(parser.parse_args())
