"""Train MiniMind's byte-level BPE tokenizer (6,400 tokens) on a streamed sample of a corpus.

    python ray_jobs/train_tokenizer.py data/sample/*.jsonl --out runs/tokenizer
    ray job submit --working-dir . -- python ray_jobs/train_tokenizer.py 's3://bucket/pretrain_hq.jsonl' \\
        --sample-mb 500 --out /mnt/shared/tokenizer

The sample is read evenly from across the inputs (local files or pyarrow URIs) without loading them
whole; the tokenizer training itself runs in this process (HF tokenizers uses every core).
"""

import argparse

from minimind.data.corpus import train_tokenizer_on_files

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="jsonl files or globs of any MiniMind format")
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--sample-mb", type=float, default=None, help="default: read everything")
    args = parser.parse_args()
    max_bytes = int(args.sample_mb * 1e6) if args.sample_mb else None
    tokenizer = train_tokenizer_on_files(args.files, args.out, args.vocab_size, max_bytes)
    print(f"wrote {args.out}: {tokenizer.vocab_size} tokens, fingerprint {tokenizer.fingerprint}")
