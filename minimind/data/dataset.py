"""In-process examples and batches from jsonl files (no Ray): for tests, small runs and workers.

:func:`load_examples` reads files through the stage formats, counting or raising on bad records;
:class:`BatchSampler` yields a seeded, per-epoch shuffled order of micro-batches that can start
from any position, which is what exact resume needs; :func:`collate` pads only to the longest
sequence in the batch and reports how much of it is padding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minimind.data.formats import IGNORE_INDEX, RecordError, RejectCounts, encode_record, iter_jsonl
from minimind.data.formats.pretrain import pack_documents, unpacked_example
from minimind.data.formats.records import in_validation_split
from minimind.data.pipeline.manifest import Manifest, is_prepared


@dataclass
class ExampleSet:
    examples: list[dict]
    rejects: RejectCounts = field(default_factory=RejectCounts)
    records_read: int = 0


def load_examples(
    files: Sequence[str | Path],
    fmt: str,
    tokenizer,
    seq_len: int,
    strict: bool = False,
    packing: bool = True,
    split: str | None = None,
    val_fraction: float = 0.0,
    allow_empty: bool = False,
) -> ExampleSet:
    """Tokenize every record of ``files`` in ``fmt``; pretrain documents are packed into blocks.

    ``split="train"`` or ``"val"`` keeps only that side of the hash split at ``val_fraction``.
    A single directory made by the prepare pipeline is read from its shards instead (its
    tokenizer, seq len and format are checked against the arguments; its split is its own).
    """
    if not files:
        raise ValueError("data.train_files is empty")
    if len(files) == 1 and is_prepared(files[0]):
        manifest = Manifest.load(files[0])
        manifest.check(tokenizer.fingerprint, seq_len, fmt)
        examples = manifest.examples(split or "train")
        if not examples and not allow_empty:
            raise ValueError(f"{files[0]}: the {split or 'train'!r} split is empty")
        rejects = RejectCounts(by_reason=Counter(manifest.rejects))
        return ExampleSet(examples, rejects, manifest.rows_in)
    rejects = RejectCounts()
    encoded: list = []
    records_read = 0
    for path in files:
        if not Path(path).exists():
            raise FileNotFoundError(f"data file not found: {path}")
        for line, record in iter_jsonl(path):
            records_read += 1
            try:
                if isinstance(record, RecordError):
                    if split == "val":
                        continue  # malformed lines are counted once, by the training side
                    raise record
                if split is not None and in_validation_split(record, val_fraction) != (split == "val"):
                    continue
                encoded.append(encode_record(fmt, record, tokenizer, seq_len))
            except RecordError as error:
                error = error if error.source is not None else error.located(str(path), line)
                if strict:
                    raise error from None
                rejects.add(error)
    if fmt == "pretrain":
        if packing:
            encoded = list(pack_documents(encoded, seq_len))
        else:
            encoded = [unpacked_example(tokens, seq_len) for tokens in encoded]
    if not encoded and not allow_empty:
        raise ValueError(f"no usable records in {list(map(str, files))}: {rejects.summary()}")
    return ExampleSet(encoded, rejects, records_read)


@dataclass
class TrainingData:
    """What the training loop reads: random-access examples, a sampler per rank, held-out examples."""

    examples: Sequence[dict]
    """``examples[i]`` is one example dict (``input_ids``/``labels``[/``document_ids``] or the DPO keys)."""
    rejects: RejectCounts
    validation: list[dict]
    """Held-out examples in a fixed order, at most the requested limit; empty without validation data."""
    lengths: Sequence[int] | None = None
    """Padded length of each example, when batches are grouped by length."""

    def sampler(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> BatchSampler:
        """This rank's micro-batches: the same count on every rank, disjoint across ranks."""
        return BatchSampler(len(self.examples), batch_size, seed, rank, world_size, self.lengths)


def validation_limit(eval_config) -> int:
    """How many held-out examples evaluation can use: the perplexity subset and the continuation documents."""
    return max(eval_config.max_examples, 4 * eval_config.continuation_docs)


def build_training_data(config, tokenizer) -> TrainingData:
    """Training examples of ``config.data`` and the held-out examples of ``config.eval``."""
    data = config.data
    held_out = config.eval.enabled and not config.eval.val_files
    train = load_examples(
        data.train_files,
        config.data_format,
        tokenizer,
        data.seq_len,
        strict=data.strict,
        packing=data.packing,
        split="train" if held_out else None,
        val_fraction=config.eval.val_fraction,
    )
    validation: list[dict] = []
    if config.eval.enabled:
        if config.eval.val_files:
            files = config.eval.val_files
            split = "val" if len(files) == 1 and is_prepared(files[0]) else None
        else:
            files, split = data.train_files, "val"
        validation = load_examples(
            files,
            config.data_format,
            tokenizer,
            data.seq_len,
            strict=data.strict,
            packing=data.packing,
            split=split,
            val_fraction=config.eval.val_fraction,
            allow_empty=True,
        ).examples[: validation_limit(config.eval)]
    lengths = None
    if data.group_by_length and config.data_format != "pretrain":
        lengths = [example_length(example) for example in train.examples]
    return TrainingData(train.examples, train.rejects, validation, lengths)


@dataclass
class BatchSampler:
    """Micro-batches of example indices: shuffled per epoch from ``seed``, sharded by rank.

    The order depends only on (seed, epoch), so ``batches(epoch, start=k)`` resumes exactly.
    With ``lengths``, each window of 64 batches is sorted by length before it is cut into
    batches, so a batch holds examples of similar length and little padding; the batches are
    then shuffled again. Each rank takes every ``world_size``-th batch; trailing batches that
    would leave ranks unequal are not used in that epoch (they come back in a later shuffle).
    """

    num_examples: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    lengths: Sequence[int] | None = None
    _cache: tuple[int, list[list[int]]] | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        """Micro-batches per epoch for this rank (the last partial batch is kept)."""
        total = -(-self.num_examples // self.batch_size)
        return total // self.world_size if self.world_size > 1 else total

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch`` in order, all ranks included."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        size = self.batch_size
        if self.lengths is None:
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        else:
            window = size * 64
            batches = []
            for start in range(0, len(order), window):
                chunk = sorted(order[start : start + window], key=self.lengths.__getitem__)
                batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
            # The last batch may be partial; it stays last so every other batch is full.
            shuffled = torch.randperm(len(batches) - 1, generator=generator).tolist()
            batches = [batches[i] for i in shuffled] + batches[-1:]
        self._cache = (epoch, batches)
        return batches

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        batches = self.epoch_batches(epoch)
        for local in range(start, len(self)):
            yield batches[local * self.world_size + self.rank]


def example_length(example: dict) -> int:
    """Padded length an example needs in a batch (for DPO, its longer side)."""
    if "chosen_ids" in example:
        return max(len(example["chosen_ids"]), len(example["rejected_ids"]))
    return len(example["input_ids"])


def _pad(rows: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([list(row) + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack examples padded to the batch's longest sequence.

    DPO pairs become one batch of 2B rows (chosen first, then rejected). ``real_tokens`` counts
    non-padding positions for throughput and padding statistics.
    """
    if "chosen_ids" in examples[0]:
        ids = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
    else:
        ids = [e["input_ids"] for e in examples]
        labels = [e["labels"] for e in examples]
    length = max(len(row) for row in ids)
    batch = {"input_ids": _pad(ids, pad_id, length), "labels": _pad(labels, IGNORE_INDEX, length)}
    if "document_ids" in examples[0]:
        batch["document_ids"] = _pad([e["document_ids"] for e in examples], -1, length)
    real = sum(len(row) for row in ids)
    batch["real_tokens"] = torch.tensor(real)
    batch["total_tokens"] = torch.tensor(batch["input_ids"].numel())
    return batch
