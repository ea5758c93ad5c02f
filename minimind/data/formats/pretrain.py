"""Pretrain format ``{"text": str}``: documents joined by ``<|im_end|>`` and packed into blocks.

Packing concatenates every document (each followed by the EOS separator) into one stream cut into
``seq_len`` blocks, so no position is padding except at the end of the very last block. Each block carries
document ids so attention can optionally stay inside documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from minimind.data.formats.records import require_text

IGNORE_INDEX = -100


def parse(record: dict) -> str:
    return require_text(record, "text")


def document_tokens(text: str, tokenizer) -> list[int]:
    """A document's ids followed by the EOS separator."""
    return tokenizer.encode(text) + [tokenizer.eos_id]


def pack_documents(documents: Iterable[list[int]], seq_len: int) -> Iterator[dict]:
    """Cut the concatenated documents into ``seq_len`` blocks; the shorter last one is kept."""
    ids: list[int] = []
    doc_ids: list[int] = []
    doc_index = 0
    for tokens in documents:
        position = 0
        while position < len(tokens):
            take = min(seq_len - len(ids), len(tokens) - position)
            ids.extend(tokens[position : position + take])
            doc_ids.extend([doc_index] * take)
            position += take
            if len(ids) == seq_len:
                yield {"input_ids": ids, "labels": list(ids), "document_ids": doc_ids}
                # A document cut by the block edge continues as document 0 of the next block.
                ids, doc_ids, doc_index = [], [], 0 if position < len(tokens) else -1
        doc_index += 1
    if ids:
        # The final, shorter block is kept whole; batching pads it and masks the padding.
        yield {"input_ids": ids, "labels": list(ids), "document_ids": doc_ids}


def unpacked_example(tokens: list[int], seq_len: int) -> dict:
    """One document per example, truncated to ``seq_len`` (MiniMind's layout; padded at batching)."""
    tokens = tokens[:seq_len]
    return {"input_ids": tokens, "labels": list(tokens)}
