"""Prepared corpora as memory-mapped token arrays: written next to each Parquet shard, read by training.

Why this format: a training worker needs random access to any row (one global shuffle per epoch,
exact resume at any micro-batch) without holding the corpus in its memory. Flat numpy arrays opened
with ``np.load(mmap_mode="r")`` give exactly that, as in nanoGPT: opening a shard reads its header,
a row is two offsets and a slice, and the pages belong to the OS page cache, so every worker on a
node shares one copy and the kernel drops it under pressure instead of swapping. The Parquet shards
stay for Ray Data (evaluation reads them), but a row of Parquet costs a page decompression, and
Python int lists cost ~50 bytes per token in every process.

Layout, next to shard ``<split>/part-<key>.parquet``:

- ``part-<key>.tokens.npy``: the token ids of every sequence, concatenated; ``uint16`` when the
  vocabulary fits, else ``uint32`` (``Manifest.token_dtype``);
- ``part-<key>.offsets.npy``: ``int64``, one more than the sequences: sequence ``s`` is
  ``tokens[offsets[s]:offsets[s + 1]]``;
- ``part-<key>.loss_mask.npy`` (sft, r1, dpo): ``uint8`` per token, 1 where the token is a target
  (its label is the token itself), 0 where its label is ``IGNORE_INDEX``. Pretrain has none: every
  token is its own label;
- ``part-<key>.document_starts.npy`` (pretrain): ``int64`` positions in ``tokens`` where a packed
  document begins inside a block (each block begins document 0), one per document, not per token.
  Document ids cannot be derived from EOS positions: texts often contain a literal ``<|im_end|>``
  (most of MiniMind's pretrain corpus does), which the tokenizer encodes as the EOS id.

A row is one sequence, except in DPO where row ``r`` is the pair of sequences ``2r`` (chosen) and
``2r + 1`` (rejected), so a pair is read from one place and both sides share the offsets array.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minimind.data.formats import IGNORE_INDEX
from minimind.data.pipeline.manifest import Manifest


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def store_stem(parquet_path: str | Path) -> str:
    """Path prefix of a shard's arrays: the Parquet path without its suffix."""
    return str(parquet_path).removesuffix(".parquet")


def _sequences(fmt: str, examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each stored sequence, in row order (DPO: chosen then rejected of each pair)."""
    if fmt == "dpo":
        return [
            (example[f"{side}_ids"], example[f"{side}_labels"])
            for example in examples
            for side in ("chosen", "rejected")
        ]
    return [(example["input_ids"], example["labels"]) for example in examples]


def write_token_store(parquet_path: str | Path, fmt: str, examples: list[dict], dtype: np.dtype) -> None:
    """Write the arrays of one shard (``examples`` in the shard's row order)."""
    stem = store_stem(parquet_path)
    sequences = _sequences(fmt, examples)
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids, _ in sequences], out=offsets[1:])
    total = int(offsets[-1])
    tokens = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in sequences), dtype=dtype, count=total)
    np.save(f"{stem}.tokens.npy", tokens)
    np.save(f"{stem}.offsets.npy", offsets)
    if fmt == "pretrain":
        document_ids = np.fromiter(
            itertools.chain.from_iterable(e["document_ids"] for e in examples), dtype=np.int64, count=total
        )
        changes = np.flatnonzero(np.diff(document_ids)) + 1
        np.save(f"{stem}.document_starts.npy", np.setdiff1d(changes, offsets))
        return
    labels = np.fromiter(itertools.chain.from_iterable(lab for _, lab in sequences), dtype=np.int64, count=total)
    # The formats label a token with itself or IGNORE_INDEX; anything else would be lost here.
    targets = labels == tokens
    representable = targets | (labels == IGNORE_INDEX)
    if not representable.all():
        position = int(np.argmin(representable))
        raise ValueError(
            f"{stem}: label {labels[position]} at token {position} is neither the token id {tokens[position]} nor "
            f"{IGNORE_INDEX}; a loss mask cannot store it"
        )
    np.save(f"{stem}.loss_mask.npy", targets.astype(np.uint8))


class _Shard(NamedTuple):
    offsets: np.ndarray
    tokens: np.ndarray
    loss_mask: np.ndarray | None
    document_starts: np.ndarray | None


class TokenStore(Sequence):
    """One split of a prepared corpus: ``store[i]`` is row ``i`` as a dict of int64 arrays.

    Rows are numbered shard by shard in manifest order. Nothing is read when the store is made: a
    shard's arrays are opened (headers read, tokens memory-mapped, offsets loaded) the first time
    one of its rows is asked for. With ``document_ids``, language-modelling rows carry them: the
    packed documents of a pretrain block, zeros in a conversation, so rows of both kinds batch
    together.
    """

    def __init__(self, manifest: Manifest, split: str, document_ids: bool = False):
        shards = manifest.splits.get(split, {}).get("shards", [])
        self.format = manifest.format
        self.dtype = np.dtype(manifest.token_dtype)
        self.document_ids = document_ids
        self.stems = [store_stem(Path(manifest.root) / shard["path"]) for shard in shards]
        self.rows_per_shard = [shard["rows"] for shard in shards]
        self.starts = np.cumsum([0, *self.rows_per_shard], dtype=np.int64)
        self._shards: list[_Shard | None] = [None] * len(shards)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _open(self, index: int) -> _Shard:
        shard = self._shards[index]
        if shard is not None:
            return shard
        stem = self.stems[index]
        tokens = np.load(f"{stem}.tokens.npy", mmap_mode="r")
        # Offsets are one int64 per sequence: held in memory, they spare a file handle per shard.
        offsets = np.load(f"{stem}.offsets.npy")
        sequences = self.rows_per_shard[index] * (2 if self.format == "dpo" else 1)
        if tokens.dtype != self.dtype or len(offsets) != sequences + 1 or offsets[-1] != len(tokens):
            raise ValueError(f"{stem}: token arrays do not match manifest.json; prepare the corpus again")
        pretrain = self.format == "pretrain"
        loss_mask = None if pretrain else np.load(f"{stem}.loss_mask.npy", mmap_mode="r")
        document_starts = np.load(f"{stem}.document_starts.npy", mmap_mode="r") if pretrain else None
        shard = self._shards[index] = _Shard(offsets, tokens, loss_mask, document_starts)
        return shard

    def _sequence(self, shard: _Shard, sequence: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = shard.offsets[sequence], shard.offsets[sequence + 1]
        ids = shard.tokens[start:end].astype(np.int64)
        if shard.loss_mask is None:
            return ids, ids
        return ids, np.where(shard.loss_mask[start:end] != 0, ids, IGNORE_INDEX)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a split with {len(self)} rows")
        shard_index = int(np.searchsorted(self.starts, index, side="right")) - 1
        shard, row = self._open(shard_index), int(index - self.starts[shard_index])
        if self.format == "dpo":
            chosen_ids, chosen_labels = self._sequence(shard, 2 * row)
            rejected_ids, rejected_labels = self._sequence(shard, 2 * row + 1)
            return {
                "chosen_ids": chosen_ids,
                "chosen_labels": chosen_labels,
                "rejected_ids": rejected_ids,
                "rejected_labels": rejected_labels,
            }
        ids, labels = self._sequence(shard, row)
        example = {"input_ids": ids, "labels": labels}
        if self.document_ids:
            example["document_ids"] = np.zeros_like(ids)
            if shard.document_starts is not None:
                start, end = shard.offsets[row], shard.offsets[row + 1]
                inside = np.searchsorted(shard.document_starts, [start, end], side="left")
                example["document_ids"][shard.document_starts[inside[0] : inside[1]] - start] = 1
                np.cumsum(example["document_ids"], out=example["document_ids"])
        return example

    def lengths(self) -> np.ndarray:
        """Padded length of every row (DPO: its longer side), from the offsets alone."""
        per_shard = []
        for index in range(len(self.stems)):
            sizes = np.diff(self._open(index).offsets)
            per_shard.append(np.maximum(sizes[0::2], sizes[1::2]) if self.format == "dpo" else sizes)
        return np.concatenate(per_shard) if per_shard else np.zeros(0, dtype=np.int64)
