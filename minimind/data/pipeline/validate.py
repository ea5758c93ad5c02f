"""Per-line validation and quality filters (pure functions; the pipeline runs them in Ray tasks)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from minimind.data.formats import dpo, pretrain, sft
from minimind.data.formats.records import RecordError, parse_line


@dataclass(frozen=True)
class Filters:
    """Optional quality filters; each rejection is counted under its own reason."""

    max_record_bytes: int = 1 << 20
    """Longer raw lines are rejected as ``too_long`` before parsing."""
    min_chars: int = 0
    max_chars: int | None = None
    min_cjk_ratio: float | None = None
    """Share of CJK characters among letters/ideographs (MiniMind cleaned with 0.86-0.9)."""
    dedup: bool = False


def detect_format(record: dict) -> str | None:
    """pretrain | sft | r1 | dpo from a record's fields (r1: an assistant turn with <think>)."""
    if "chosen" in record or "rejected" in record:
        return "dpo"
    if "conversations" in record:
        messages = record["conversations"]
        if isinstance(messages, list) and any(
            isinstance(m, dict) and m.get("role") == "assistant" and "<think>" in str(m.get("content", ""))
            for m in messages
        ):
            return "r1"
        return "sft"
    if "text" in record:
        return "pretrain"
    return None


def record_text(fmt: str, parsed) -> str:
    """The text the length and language filters look at."""
    if fmt == "pretrain":
        return parsed
    if fmt == "dpo":
        return "".join(m["content"] for m in parsed[0] + parsed[1][-1:])
    return "".join(m["content"] for m in parsed)


def cjk_ratio(text: str) -> float:
    """CJK ideographs over all letters and ideographs (digits, spaces and punctuation ignored)."""
    cjk = letters = 0
    for char in text:
        if "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf":
            cjk += 1
            letters += 1
        elif char.isalpha():
            letters += 1
    return cjk / letters if letters else 0.0


def validate_line(raw: bytes, fmt: str, filters: Filters) -> tuple[dict, str]:
    """The parsed, checked record and a content hash, or a RecordError naming the field."""
    if len(raw) > filters.max_record_bytes:
        raise RecordError("too_long", f"record of {len(raw)} bytes exceeds the {filters.max_record_bytes}-byte limit")
    record = parse_line(raw)
    if fmt == "pretrain":
        parsed = pretrain.parse(record)
        canonical = {"text": parsed}
    elif fmt in ("sft", "r1"):
        parsed = sft.parse(record)
        canonical = {"conversations": parsed}
    elif fmt == "dpo":
        parsed = dpo.parse(record)
        canonical = {"chosen": parsed[0], "rejected": parsed[1]}
    else:
        raise ValueError(f"unknown format {fmt!r}")
    text = record_text(fmt, parsed)
    if len(text) < filters.min_chars:
        raise RecordError("filtered_too_short", f"{len(text)} characters < min_chars={filters.min_chars}")
    if filters.max_chars is not None and len(text) > filters.max_chars:
        raise RecordError("filtered_too_long", f"{len(text)} characters > max_chars={filters.max_chars}")
    if filters.min_cjk_ratio is not None:
        ratio = cjk_ratio(text)
        if ratio < filters.min_cjk_ratio:
            raise RecordError("filtered_cjk_ratio", f"CJK ratio {ratio:.2f} < {filters.min_cjk_ratio}")
    encoded = json.dumps(canonical, ensure_ascii=False, sort_keys=True)
    digest = hashlib.blake2b(encoded.encode("utf-8"), digest_size=8).hexdigest()
    return canonical, digest
