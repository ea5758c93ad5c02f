"""What the training loop reads: :func:`build_training_data` and :func:`collate`.

A run trains on one source (``data.train_files``) or several drawn by weight (``data.mixture``).
A source is a prepared corpus, memory-mapped so a worker's memory and start-up time do not grow
with it, or jsonl files tokenized in memory (small runs). Held-out examples come from the prepared
``val`` split, from ``eval.val_files``, or from the same single pass over jsonl training files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from minimind.data.formats import IGNORE_INDEX, RejectCounts
from minimind.data.jsonl import load_examples, split_examples
from minimind.data.pipeline.manifest import Manifest, is_prepared, local_corpus
from minimind.data.sampler import BatchSampler, Mixture
from minimind.data.token_store import TokenStore

LANGUAGE_MODELLING_FORMATS = ("pretrain", "sft", "r1")
"""Formats every stage but DPO can train on, alone or mixed: they all have input ids and labels."""


@dataclass
class TrainingData:
    """What the training loop reads: random-access examples, a sampler per rank, held-out examples."""

    examples: Sequence[dict]
    """``examples[i]`` is one example dict (``input_ids``/``labels``[/``document_ids``] or the DPO keys),
    its values int lists or int64 arrays."""
    rejects: RejectCounts
    validation: list[dict]
    """Held-out examples in a fixed order, at most the requested limit; empty without validation data."""
    lengths: Sequence[int] | None = None
    """Padded length of each example, when batches are grouped by length."""
    mixture: Mixture | None = None
    """The sources ``examples`` concatenates and their weights, when training on a mixture."""

    def sampler(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> BatchSampler:
        """This rank's micro-batches: the same count on every rank, disjoint across ranks."""
        return BatchSampler(len(self.examples), batch_size, seed, rank, world_size, self.lengths, self.mixture)


def validation_limit(eval_config) -> int:
    """How many held-out examples evaluation can use: the perplexity subset and the continuation documents."""
    return max(eval_config.max_examples, 4 * eval_config.continuation_docs)


@dataclass
class Source:
    """One opened source: its training examples and its first held-out examples."""

    examples: Sequence[dict]
    validation: list[dict]
    rejects: RejectCounts


class Concatenation(Sequence):
    """Several sources' examples as one sequence, numbered source after source."""

    def __init__(self, parts: list[Sequence[dict]]):
        self.parts = parts
        self.starts = np.cumsum([0, *map(len, parts)], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][int(index - self.starts[part])]


def _leading_rows(store: TokenStore, limit: int) -> list[dict]:
    """The first ``limit`` rows of a memory-mapped split, as int lists (a small, fixed set)."""
    return [{key: value.tolist() for key, value in store[i].items()} for i in range(min(limit, len(store)))]


def _open_prepared(where: str, path: str, fmt: str | None, config, tokenizer) -> Manifest:
    manifest = Manifest.load(local_corpus(path))  # a corpus at a URI is copied to this node once
    try:
        manifest.check(tokenizer.fingerprint, config.data.seq_len, fmt)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return manifest


def _document_ids(examples: list[dict], wanted: bool) -> list[dict]:
    """Give language-modelling examples ``document_ids`` exactly when the run masks documents, so
    every example batches with every other (conversations and unpacked documents are one document)."""
    for example in examples:
        if not wanted:
            example.pop("document_ids", None)
        elif "input_ids" in example and "document_ids" not in example:
            example["document_ids"] = [0] * len(example["input_ids"])
    return examples


def _open_source(
    fields: tuple[str, str], files: list[str], fmt: str | None, config, tokenizer, hold_out: bool
) -> Source:
    """One source: a prepared corpus (its own train/val split) or jsonl files in ``fmt``.

    ``fields`` name its files and format in the config, for errors. ``fmt`` is None for a mixture
    source that does not name one: a prepared corpus states its own, jsonl is read in the stage's.
    """
    files_field, format_field = fields
    if not files:
        raise ValueError(f"{files_field} is empty")
    data, limit = config.data, validation_limit(config.eval)
    if len(files) == 1 and is_prepared(files[0]):
        manifest = _open_prepared(files_field, files[0], fmt, config, tokenizer)
        _check_stage(files_field, manifest.format, config.stage)
        examples = TokenStore(manifest, "train", data.document_mask)
        if not len(examples):
            raise ValueError(f"{files_field}: the 'train' split of {files[0]} is empty")
        validation = _leading_rows(TokenStore(manifest, "val", data.document_mask), limit) if hold_out else []
        return Source(examples, validation, RejectCounts(by_reason=Counter(manifest.rejects)))
    if fmt is None:
        fmt = config.data_format
    _check_stage(format_field, fmt, config.stage)
    fraction = config.eval.val_fraction if hold_out else 0.0
    train, validation = split_examples(
        files, fmt, tokenizer, data.seq_len, fraction, limit, strict=data.strict, packing=data.packing
    )
    masked = data.document_mask
    return Source(_document_ids(train.examples, masked), _document_ids(validation, masked), train.rejects)


def _check_stage(where: str, fmt: str, stage: str) -> None:
    allowed = ("dpo",) if stage == "dpo" else LANGUAGE_MODELLING_FORMATS
    if fmt not in allowed:
        raise ValueError(f"{where}: holds {fmt!r} data, but stage {stage!r} trains on {' or '.join(allowed)} data")


def _validation_files(config, tokenizer) -> list[dict]:
    """The first held-out examples of ``eval.val_files``: a prepared corpus's val split, or the
    first records of jsonl files (read no further than needed)."""
    files, data, limit = config.eval.val_files, config.data, validation_limit(config.eval)
    if len(files) == 1 and is_prepared(files[0]):
        manifest = _open_prepared("eval.val_files", files[0], config.data_format, config, tokenizer)
        return _leading_rows(TokenStore(manifest, "val", data.document_mask), limit)
    validation = load_examples(
        files, config.data_format, tokenizer, data.seq_len, data.strict, data.packing, allow_empty=True, limit=limit
    ).examples
    return _document_ids(validation, data.document_mask)


def build_training_data(config, tokenizer) -> TrainingData:
    """Training examples of ``config.data`` and the held-out examples of ``config.eval``."""
    data = config.data
    hold_out = config.eval.enabled and not config.eval.val_files
    if data.mixture:
        specs = [
            ((f"data.mixture[{i}].files", f"data.mixture[{i}].format"), s.files, s.format)
            for i, s in enumerate(data.mixture)
        ]
    else:
        specs = [(("data.train_files", "data.format"), data.train_files, config.data_format)]
    sources = [_open_source(fields, files, fmt, config, tokenizer, hold_out) for fields, files, fmt in specs]
    rejects = RejectCounts(sum((Counter(s.rejects.by_reason) for s in sources), Counter()))
    rejects.examples = [example for s in sources for example in s.rejects.examples][: rejects.max_examples]
    if config.eval.val_files:
        validation = _validation_files(config, tokenizer)
    else:  # each source's held-out examples, in source order
        validation = [example for source in sources for example in source.validation]
    validation = validation[: validation_limit(config.eval)]
    examples = sources[0].examples if len(sources) == 1 else Concatenation([s.examples for s in sources])
    lengths = None
    if data.group_by_length and config.data_format != "pretrain":
        lengths = np.concatenate([_lengths(source.examples) for source in sources])
    mixture = None
    if data.mixture:
        mixture = Mixture(tuple(len(s.examples) for s in sources), tuple(s.weight for s in data.mixture))
    return TrainingData(examples, rejects, validation, lengths, mixture)


def _lengths(examples: Sequence[dict]) -> np.ndarray:
    if isinstance(examples, TokenStore):
        return examples.lengths()
    return np.array([example_length(example) for example in examples], dtype=np.int64)


def example_length(example: dict) -> int:
    """Padded length an example needs in a batch (for DPO, its longer side)."""
    if "chosen_ids" in example:
        return max(len(example["chosen_ids"]), len(example["rejected_ids"]))
    return len(example["input_ids"])


def _pad(rows: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    padded = np.full((len(rows), length), value, dtype=np.int64)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = row
    return torch.from_numpy(padded)


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack examples (int lists or arrays) padded to the batch's longest sequence.

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
