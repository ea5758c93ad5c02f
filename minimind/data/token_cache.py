"""jsonl files tokenized once per machine: each record of a local jsonl file as a stage format encodes it (or the
error it raised), kept under ``MINIMIND_CACHE/tokenized`` (default ``~/.cache/minimind``).

Without it, a run on jsonl tokenizes the whole file in every rank, and again in every resume and in every trial of
a sweep on the same file (the sample's pretrain file: ~1.2 s of one core each time). With it, only the ranks of the
first run, which start together, do. A corpus too large to hold as Python lists is prepared once instead
(:mod:`minimind.data.pipeline.prepare`).

An entry's key covers the file's content (its sha256), the format, ``seq_len`` where the format truncates to it,
the tokenizer's fingerprint and the source of the code that parses and encodes records: a change to any of them
reads the file afresh. Entries are written to a temporary folder and renamed into place
(:func:`minimind.storage.build_in_place`), so ranks racing to write one, or a writer killed halfway, leave a whole
entry or none. Nothing evicts entries: deleting the folder at any time only costs the next reads their tokenizing.
A cache that cannot be written or read is warned about and passed by.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import minimind.tokenizer as tokenizer_package
from minimind.data import formats
from minimind.data.formats import RecordError
from minimind.storage import build_in_place, cache_root

PARSED, UNREADABLE, UNENCODABLE = 0, 1, 2  # a record's state: encoded, not a JSON object, rejected by its format
LIST_FIELD = "tokens"  # pretrain encodes a document as a token list; the other formats as named lists


@dataclass
class CachedRecord:
    """One non-blank line of the file: its number, its hash-split bucket and what encoding it gave."""

    line: int
    bucket: int | None  # None for a line that is not a JSON object (it has no side of the split)
    encoded: dict | list[int] | None
    error: RecordError | None


@functools.cache
def _code_version() -> str:
    """sha256 of the code whose output is cached: the formats' and the tokenizer's modules, and this one."""
    packages = (Path(formats.__file__).parent, Path(tokenizer_package.__file__).parent)
    sources = [*sorted(p for package in packages for p in package.glob("*.py")), Path(__file__)]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def entry_dir(path: str | Path, fmt: str, tokenizer, seq_len: int) -> Path:
    """Where the cache keeps the records of ``path`` for this format, tokenizer and ``seq_len``."""
    content = hashlib.sha256()
    with open(path, "rb") as handle:  # ~5 ms for the sample's 3 MB: next to nothing beside tokenizing it
        while chunk := handle.read(1 << 20):
            content.update(chunk)
    truncates_at = seq_len if fmt != "pretrain" else None  # pretrain documents are packed later, whole
    key = json.dumps([content.hexdigest(), fmt, truncates_at, tokenizer.fingerprint, _code_version()])
    return cache_root() / "tokenized" / f"{Path(path).name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def read(directory: Path, source: str) -> list[CachedRecord] | None:
    """The records of a cache entry (errors located in ``source``), or None where there is no entry."""
    if not directory.is_dir():
        return None
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        with np.load(directory / "records.npz", allow_pickle=False) as arrays:
            columns = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError) as error:  # zipfile.BadZipFile and json's errors are ValueErrors
        warnings.warn(f"token cache: cannot read {directory} ({error}); tokenizing {source} instead", stacklevel=2)
        return None
    errors = {e["index"]: RecordError(e["reason"], e["detail"], e["field_name"]) for e in meta["errors"]}
    fields = meta["fields"]
    values = {name: columns[f"{name}.values"].tolist() for name in fields}
    offsets = {name: columns[f"{name}.offsets"].tolist() for name in fields}
    records = []
    for index, (line, bucket, state) in enumerate(zip(columns["line"].tolist(), columns["bucket"].tolist(),
                                                      columns["state"].tolist())):  # fmt: skip
        encoded = None
        if state == PARSED:
            lists = {name: values[name][offsets[name][index] : offsets[name][index + 1]] for name in fields}
            encoded = lists[LIST_FIELD] if meta["list"] else lists
        error = errors[index].located(source, line) if index in errors else None
        records.append(CachedRecord(line, bucket if state != UNREADABLE else None, encoded, error))
    return records


def write(directory: Path, records: list[CachedRecord]) -> None:
    """Store ``records`` as the entry ``directory`` (unless another process stored it first)."""
    encoded = [r.encoded for r in records if r.encoded is not None]
    as_list = bool(encoded) and isinstance(encoded[0], list)
    fields = [LIST_FIELD] if as_list or not encoded else sorted(encoded[0])
    if not as_list and any(sorted(e) != fields for e in encoded):
        return  # only encodings of one shape are stored (every format has one today)
    columns = {
        "line": np.array([r.line for r in records], dtype=np.int64),
        "bucket": np.array([r.bucket or 0 for r in records], dtype=np.uint64),
        "state": np.array(
            [PARSED if r.encoded is not None else UNREADABLE if r.bucket is None else UNENCODABLE for r in records],
            dtype=np.int8,
        ),
    }
    for name in fields:
        lists = [([] if r.encoded is None else r.encoded if as_list else r.encoded[name]) for r in records]
        columns[f"{name}.offsets"] = np.cumsum([0, *map(len, lists)], dtype=np.int64)
        columns[f"{name}.values"] = np.fromiter((v for values in lists for v in values), dtype=np.int32)
    errors = [{"index": i, "reason": r.error.reason, "detail": r.error.detail, "field_name": r.error.field_name}
              for i, r in enumerate(records) if r.error is not None]  # fmt: skip

    def fill(staging: Path) -> None:
        np.savez(staging / "records.npz", **columns)
        meta = {"list": as_list, "fields": fields, "errors": errors}
        (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")

    try:
        build_in_place(directory, fill)
    except OSError as error:
        if not directory.is_dir():  # else another process stored it after all
            warnings.warn(f"token cache: cannot store {directory} ({error}); the next read tokenizes again",
                          stacklevel=2)  # fmt: skip
