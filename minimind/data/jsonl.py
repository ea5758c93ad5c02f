"""In-memory examples from jsonl files, no Ray: for tests, small runs and validation files.

Every record goes through the stage formats; a bad record is counted by reason or, when strict,
raised with its file, line and field. A file read in full is tokenized once per machine
(:mod:`.token_cache`). Pretrain documents are packed into ``seq_len`` blocks (or kept one per
example). Examples here are Python int lists, ~50 bytes per token in every process:
a large corpus is prepared once and memory-mapped instead (:mod:`minimind.data.token_store`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from minimind.data import token_cache
from minimind.data.formats import RecordError, RejectCounts, encode_record, iter_jsonl
from minimind.data.formats.pretrain import pack_documents, unpacked_example
from minimind.data.formats.records import bucket_in_validation, split_bucket


@dataclass
class ExampleSet:
    examples: list[dict]
    rejects: RejectCounts = field(default_factory=RejectCounts)
    records_read: int = 0


class _Side:
    """Encoded records of one side of the split, shaped into examples at the end.

    With ``limit`` it is ``full`` as soon as it makes that many examples (packed pretrain: once it
    holds the tokens of ``limit`` full blocks), so readers can stop early.
    """

    def __init__(self, fmt: str, seq_len: int, packing: bool, limit: int | None = None):
        self.fmt, self.seq_len, self.limit = fmt, seq_len, limit
        self.packed = fmt == "pretrain" and packing
        self.encoded: list = []
        self.tokens = 0

    def add(self, encoded) -> None:
        self.encoded.append(encoded)
        if self.packed:
            self.tokens += len(encoded)

    @property
    def full(self) -> bool:
        if self.limit is None:
            return False
        made = self.tokens // self.seq_len if self.packed else len(self.encoded)
        return made >= self.limit

    def examples(self) -> list[dict]:
        examples = self.encoded
        if self.packed:
            examples = list(pack_documents(examples, self.seq_len))
        elif self.fmt == "pretrain":
            examples = [unpacked_example(tokens, self.seq_len) for tokens in examples]
        return examples[: self.limit]


def _encoded_records(
    files: Sequence[str | Path],
    fmt: str,
    tokenizer,
    seq_len: int,
    strict: bool,
    val_fraction: float,
    wanted: Callable[[bool], bool],
    result: ExampleSet,
    whole: bool = False,
) -> Iterator[tuple[bool, dict | list[int]]]:
    """``(held_out, encoded)`` for each usable record whose side is ``wanted``; lines are counted in
    ``result.records_read`` and bad records in ``result.rejects`` (raised when ``strict``). ``whole``: the caller
    reads every record, so each file comes from the token cache (see :func:`_file_records`)."""
    for path in files:
        if not Path(path).exists():
            raise FileNotFoundError(f"data file not found: {path}")
        for _, bucket, encode in _file_records(path, fmt, tokenizer, seq_len, whole):
            result.records_read += 1
            try:
                if bucket is None:
                    encode()  # the line is not a JSON object: this raises why
                held_out = bucket_in_validation(bucket, val_fraction)
                if not wanted(held_out):
                    continue
                encoded = encode()
            except RecordError as error:  # located: see _read
                if strict:
                    raise error from None
                result.rejects.add(error)
                continue
            yield held_out, encoded


Encode = Callable[[], "dict | list[int]"]


def _file_records(path, fmt: str, tokenizer, seq_len: int, whole: bool) -> Iterator[tuple[int, int | None, Encode]]:
    """``(line, split bucket, encode)`` for each non-blank line of ``path``, where ``encode()`` gives the record's
    encoding or raises its RecordError, and the bucket is None for a line that is not a JSON object. A ``whole``
    read comes from the token cache, where the file is encoded in full first if it is not there yet. Any other read
    (one that stops early: the first examples of a validation file) reads the file here, encoding a record only when
    asked: looking it up would hash the whole file."""
    if not whole:
        yield from _read(path, fmt, tokenizer, seq_len)
        return
    entry = token_cache.entry_dir(path, fmt, tokenizer, seq_len)
    records = token_cache.read(entry, str(path))
    if records is None:
        records = [_outcome(*read) for read in _read(path, fmt, tokenizer, seq_len)]
        token_cache.write(entry, records)
    for record in records:
        yield record.line, record.bucket, functools.partial(_replay, record)


def _read(path, fmt: str, tokenizer, seq_len: int) -> Iterator[tuple[int, int | None, Encode]]:
    """What :func:`_file_records` yields, read from the file; every RecordError names its file and line."""
    for line, record in iter_jsonl(path):  # a line that is not a JSON object comes located
        if isinstance(record, RecordError):
            yield line, None, functools.partial(_raise, record)
        else:
            yield line, split_bucket(record), functools.partial(_encode, path, line, fmt, record, tokenizer, seq_len)


def _encode(path, line: int, fmt: str, record: dict, tokenizer, seq_len: int) -> dict | list[int]:
    try:
        return encode_record(fmt, record, tokenizer, seq_len)
    except RecordError as error:
        raise (error if error.source is not None else error.located(str(path), line)) from None


def _outcome(line: int, bucket: int | None, encode: Encode) -> token_cache.CachedRecord:
    try:
        return token_cache.CachedRecord(line, bucket, encode(), None)
    except RecordError as error:
        return token_cache.CachedRecord(line, bucket, None, error)


def _replay(record: token_cache.CachedRecord) -> dict | list[int]:
    if record.error is not None:
        raise record.error
    return record.encoded


def _raise(error: RecordError):
    raise error


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
    limit: int | None = None,
) -> ExampleSet:
    """Tokenize the records of ``files`` in ``fmt``; pretrain documents are packed into blocks.

    ``split="train"`` or ``"val"`` keeps only that side of the hash split at ``val_fraction``.
    ``limit`` stops reading once that many examples are made (the first records only).
    """
    if not files:
        raise ValueError("no data files given")
    result = ExampleSet([])
    side = _Side(fmt, seq_len, packing, limit)
    held_out = split == "val"
    fraction = val_fraction if split else 0.0
    for _, encoded in _encoded_records(
        files, fmt, tokenizer, seq_len, strict, fraction, lambda in_val: in_val == held_out, result, limit is None
    ):
        side.add(encoded)
        if side.full:
            break
    result.examples = side.examples()
    if not result.examples and not allow_empty:
        raise ValueError(f"no usable records in {list(map(str, files))}: {result.rejects.summary()}")
    return result


def split_examples(
    files: Sequence[str | Path],
    fmt: str,
    tokenizer,
    seq_len: int,
    val_fraction: float,
    val_limit: int,
    strict: bool = False,
    packing: bool = True,
) -> tuple[ExampleSet, list[dict]]:
    """One pass over ``files``: the training side of the hash split at ``val_fraction``, and the
    first ``val_limit`` held-out examples. Every record is tokenized, once per machine (the token cache)."""
    if not files:
        raise ValueError("no data files given")
    result = ExampleSet([])
    train = _Side(fmt, seq_len, packing)
    validation = _Side(fmt, seq_len, packing, val_limit)

    def wanted(in_val: bool) -> bool:
        return not (in_val and validation.full)

    for in_val, encoded in _encoded_records(files, fmt, tokenizer, seq_len, strict, val_fraction, wanted, result, True):
        (validation if in_val else train).add(encoded)
    result.examples = train.examples()
    if not result.examples:
        raise ValueError(f"no usable training records in {list(map(str, files))}: {result.rejects.summary()}")
    return result, validation.examples()
