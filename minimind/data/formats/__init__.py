"""Pure per-record transforms for MiniMind's jsonl formats; no Ray, no training.

``encode_record(fmt, record, tokenizer, seq_len)`` validates one parsed JSON object and returns
its token ids and labels (for ``pretrain``, the document's ids: packing happens across records).
"""

from __future__ import annotations

from minimind.data.formats import dpo, pretrain, sft
from minimind.data.formats.pretrain import IGNORE_INDEX
from minimind.data.formats.records import RecordError, RejectCounts, iter_jsonl

FORMATS = ("pretrain", "sft", "dpo", "r1")


def encode_record(fmt: str, record: dict, tokenizer, seq_len: int) -> dict | list[int]:
    if fmt == "pretrain":
        return pretrain.document_tokens(pretrain.parse(record), tokenizer)
    if fmt in ("sft", "r1"):
        return sft.encode_conversation(sft.parse(record), tokenizer, seq_len)
    if fmt == "dpo":
        return dpo.encode_pair(dpo.parse(record), tokenizer, seq_len)
    raise ValueError(f"unknown data format {fmt!r}; choose from {FORMATS}")


__all__ = ["FORMATS", "IGNORE_INDEX", "RecordError", "RejectCounts", "encode_record", "iter_jsonl"]
