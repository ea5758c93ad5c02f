"""Command line of the prepare pipeline (``minimind prepare`` and ``ray_jobs/prepare.py``)."""

from __future__ import annotations

import argparse

from minimind.data.formats import FORMATS


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="jsonl files or globs, local or pyarrow URIs (s3://...)")
    parser.add_argument("--out", required=True, help="output directory (Parquet shards + manifest.json)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: detected from the first records")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or file; default: the bundled one")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--max-record-bytes", type=int, default=1 << 20)
    parser.add_argument("--min-chars", type=int, default=0)
    parser.add_argument("--max-chars", type=int, default=None)
    parser.add_argument(
        "--min-cjk-ratio",
        type=float,
        default=None,
        help="drop records whose CJK share is lower (MiniMind cleaned at 0.86-0.9)",
    )
    parser.add_argument("--dedup", action="store_true", help="remove exact duplicate records")
    parser.add_argument("--actors", type=int, default=2, help="tokenizer actors (capped at the cluster's CPUs - 1)")
    parser.add_argument("--tokenizer-threads", type=int, default=1, help="encode threads per actor")
    parser.add_argument("--rows-per-shard", type=int, default=8192)
    parser.add_argument("--chunk-mb", type=int, default=32, help="bytes of input per read task")
    parser.add_argument("--seed", type=int, default=0)


def run_prepare(args: argparse.Namespace):
    import ray

    from minimind.data.pipeline.prepare import PrepareOptions, prepare
    from minimind.data.pipeline.validate import Filters

    filters = Filters(args.max_record_bytes, args.min_chars, args.max_chars, args.min_cjk_ratio, args.dedup)
    options = PrepareOptions(
        inputs=args.inputs,
        out=args.out,
        format=args.format,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        strict=args.strict,
        filters=filters,
        chunk_bytes=args.chunk_mb << 20,
        rows_per_shard=args.rows_per_shard,
        actors=args.actors,
        tokenizer_threads=args.tokenizer_threads,
        seed=args.seed,
    )
    ray.init(ignore_reinit_error=True)
    manifest = prepare(options)
    print(manifest.summary(), flush=True)
    return manifest
