"""Padding of conversation batches: random batches vs length-grouped batches (the sampler's default).

The SFT sample, tokenized as training does (seq 512), cut into micro-batches of 16 for one epoch by the
training sampler with and without the examples' lengths; padding = 1 - real tokens / padded tokens.

    python benchmarks/sft_padding.py
    python benchmarks/sft_padding.py --data data/sample/sft.jsonl --seq-len 512 --batch-size 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minimind.data.jsonl import load_examples  # noqa: E402
from minimind.data.sampler import BatchSampler  # noqa: E402
from minimind.tokenizer import load_tokenizer  # noqa: E402


def padding(lengths: list[int], sampler: BatchSampler) -> float:
    real = padded = 0
    for batch in sampler.batches(epoch=0):
        longest = max(lengths[i] for i in batch)
        real += sum(lengths[i] for i in batch)
        padded += longest * len(batch)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data/sample/sft.jsonl"))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    examples = load_examples([args.data], "sft", load_tokenizer(None), args.seq_len).examples
    lengths = [len(example["input_ids"]) for example in examples]
    random = padding(lengths, BatchSampler(len(lengths), args.batch_size, seed=0))
    grouped = padding(lengths, BatchSampler(len(lengths), args.batch_size, seed=0, lengths=lengths))
    print(f"{len(lengths):,} conversations, seq {args.seq_len}, batches of {args.batch_size}: padding {random:.1%} "
          f"in random batches, {grouped:.1%} length-grouped")  # fmt: skip


if __name__ == "__main__":
    main()
