"""Reading MiniMind jsonl records with their file and line, and validating their fields.

Every malformed record becomes a :class:`RecordError` that names the file, the line and the field.
Strict readers raise it; lenient ones (the default) count it by reason in :class:`RejectCounts`
and go on, so nothing is dropped without a number to show for it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimind.tokenizer import ROLES


class RecordError(ValueError):
    """A bad record: ``reason`` is a short stable key used for counting."""

    def __init__(
        self,
        reason: str,
        message: str,
        field_name: str | None = None,
        source: str | None = None,
        line: int | None = None,
    ):
        self.reason = reason
        self.detail = message
        self.field_name = field_name
        self.source = source
        self.line = line
        super().__init__(self._format())

    def _format(self) -> str:
        where = f"{self.source}:{self.line}" if self.source is not None else "record"
        field_part = f" field {self.field_name!r}:" if self.field_name else ""
        return f"{where}:{field_part} {self.detail} [{self.reason}]"

    def located(self, source: str, line: int) -> RecordError:
        return RecordError(self.reason, self.detail, self.field_name, source, line)


@dataclass
class RejectCounts:
    """Rejected records by reason, with the first few examples kept for the summary."""

    by_reason: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def add(self, error: RecordError) -> None:
        self.by_reason[error.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def summary(self) -> str:
        if not self.total:
            return "no rejected records"
        reasons = ", ".join(f"{reason}={count}" for reason, count in self.by_reason.most_common())
        # A prepared corpus brings counts only; its rows are listed in its rejects/ folder.
        first = f"; first: {self.examples[0]}" if self.examples else ""
        return f"{self.total} rejected records ({reasons}){first}"


def parse_line(raw: bytes) -> dict:
    """One jsonl line as a JSON object, or a RecordError (without location) saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordError("undecodable_bytes", f"not UTF-8 ({error.reason})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError("invalid_json", f"invalid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    return record


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any | RecordError]]:
    """Yield ``(line_number, record)``; a line that is not a JSON object yields a located RecordError."""
    source = str(path)
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield line_number, parse_line(raw)
            except RecordError as error:
                yield line_number, error.located(source, line_number)


def require_text(record: dict, name: str) -> str:
    if name not in record:
        raise RecordError("missing_field", "missing", name)
    value = record[name]
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"expected a string, got {type(value).__name__}", name)
    if not value.strip():
        raise RecordError("empty_text", "empty", name)
    return value


def require_messages(record: dict, name: str) -> list[dict]:
    """A list of messages with known roles and at least one assistant turn.

    Each message has a string ``content``; MiniMind's tool and reasoning data may add ``reasoning_content`` (a
    string), ``tool_calls`` (on an assistant message) and ``tools`` (on a system message), each a list or a JSON
    string of one, as its SFT dataset reads them. An assistant message needs content, reasoning or tool calls.
    """
    if name not in record:
        raise RecordError("missing_field", "missing", name)
    messages = record[name]
    if not isinstance(messages, list) or not messages:
        raise RecordError("wrong_type", "expected a non-empty list of messages", name)
    cleaned = []
    for index, message in enumerate(messages):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise RecordError("wrong_type", f"expected an object, got {type(message).__name__}", where)
        role = message.get("role")
        if role not in ROLES:
            raise RecordError("unknown_role", f"role {role!r} is not one of {ROLES}", f"{where}.role")
        content = message.get("content")
        if content is None and message.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            reason = "missing_field" if content is None else "wrong_type"
            raise RecordError(reason, f"expected a string, got {type(content).__name__}", f"{where}.content")
        cleaned_message = {"role": role, "content": content}
        reasoning = message.get("reasoning_content")
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise RecordError(
                    "wrong_type", f"expected a string, got {type(reasoning).__name__}", f"{where}.reasoning_content"
                )
            cleaned_message["reasoning_content"] = reasoning
        for field_name, allowed_role in (("tool_calls", "assistant"), ("tools", "system")):
            value = _json_list(message.get(field_name), f"{where}.{field_name}")
            if value:
                if role != allowed_role:
                    raise RecordError(
                        "misplaced_field", f"only an {allowed_role} message carries it", f"{where}.{field_name}"
                    )
                cleaned_message[field_name] = value
        if role == "assistant" and not (
            content.strip() or cleaned_message.get("reasoning_content", "").strip() or "tool_calls" in cleaned_message
        ):
            raise RecordError("empty_text", "empty assistant reply", f"{where}.content")
        cleaned.append(cleaned_message)
    if not any(message["role"] == "assistant" for message in cleaned):
        raise RecordError("no_assistant_turn", "conversation has no assistant turn", name)
    return cleaned


def _json_list(value, where: str) -> list | None:
    """A list field given as a list or as a JSON string of one (MiniMind stores tools and tool calls as strings)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RecordError("invalid_json", f"not valid JSON ({error.msg})", where) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise RecordError("wrong_type", "expected a list of objects", where)
    return value


def split_bucket(record: dict) -> int:
    """A hash of the record's canonical JSON in [0, 2**64): its side of the split at any fraction."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(canonical, digest_size=8).digest(), "big")


def bucket_in_validation(bucket: int, fraction: float) -> bool:
    return fraction > 0 and bucket < fraction * 2**64


def in_validation_split(record: dict, fraction: float) -> bool:
    """Whether ``record`` belongs to the held-out split: a hash of its canonical JSON, so a record's
    side never changes when other records are added, removed or reordered."""
    return fraction > 0 and bucket_in_validation(split_bucket(record), fraction)
