"""Plain text of any MiniMind jsonl file, for tokenizer training."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from minimind.data.formats.records import RecordError, iter_jsonl

MESSAGE_FIELDS = ("conversations", "chosen", "rejected")


def iter_texts(files: Iterable[str | Path], max_chars: int | None = None) -> Iterator[str]:
    """Yield every document text and message content; stop after ``max_chars`` characters.

    Malformed lines are skipped here: a tokenizer sample does not need every record, and the
    training pipeline reports them.
    """
    seen = 0
    for path in files:
        for _line, record in iter_jsonl(path):
            if isinstance(record, RecordError):
                continue
            texts = [record["text"]] if isinstance(record.get("text"), str) else []
            for name in MESSAGE_FIELDS:
                messages = record.get(name)
                if isinstance(messages, list):
                    texts.extend(
                        m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)
                    )
            for text in texts:
                yield text
                seen += len(text)
                if max_chars is not None and seen >= max_chars:
                    return
