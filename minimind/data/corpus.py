"""Plain text of any MiniMind jsonl file, for tokenizer training."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from minimind.data.pipeline.chunks import resolve_inputs, sample_lines

MESSAGE_FIELDS = ("conversations", "chosen", "rejected")


def record_texts(record: dict) -> list[str]:
    """Every document text and message content of a record of any MiniMind format."""
    texts = [record["text"]] if isinstance(record.get("text"), str) else []
    for name in MESSAGE_FIELDS:
        messages = record.get(name)
        if isinstance(messages, list):
            texts.extend(m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    return texts


def iter_texts(files: Iterable[str], max_bytes: int | None = None) -> Iterator[str]:
    """Texts of a streamed sample of about ``max_bytes`` spread over the files (all of them if None).

    Malformed lines are skipped here: a tokenizer sample does not need every record, and the
    prepare pipeline reports them.
    """
    paths = resolve_inputs([str(f) for f in files])
    for line in sample_lines(paths, max_bytes if max_bytes is not None else 1 << 62, pieces=64 if max_bytes else 1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            yield from record_texts(record)


def train_tokenizer_on_files(files: list[str], out: str, vocab_size: int = 6400, max_bytes: int | None = None):
    """Train the byte-level BPE tokenizer on a streamed sample of ``files`` and save it to ``out``."""
    from minimind.tokenizer import MiniMindTokenizer, train_tokenizer

    tokenizer = MiniMindTokenizer(train_tokenizer(iter_texts(files, max_bytes), vocab_size))
    tokenizer.save_pretrained(out)
    return tokenizer
