"""SFT format ``{"conversations": [{"role", "content"}, ...]}``.

The conversation is rendered with the chat template and tokenized as one string (exactly what the
model sees when chatting). Labels are set only on tokens that start inside an assistant message's
content or its closing ``<|im_end|>``; system, user, role headers and padding are ignored. Roles
come from the data, not from turn parity.
"""

from __future__ import annotations

from collections.abc import Sequence

from minimind.data.formats.pretrain import IGNORE_INDEX
from minimind.data.formats.records import RecordError, require_messages
from minimind.tokenizer import render_chat


def parse(record: dict) -> list[dict[str, str]]:
    return require_messages(record, "conversations")


def encode_conversation(
    messages: Sequence[dict], tokenizer, seq_len: int, last_turn_only: bool = False, field_name: str = "conversations"
) -> dict:
    """``input_ids``/``labels`` for a conversation, truncated to ``seq_len`` tokens.

    ``last_turn_only`` trains on the final assistant message alone (DPO responses).
    """
    text, spans = render_chat(messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    targets = [span for span in spans if span.role == "assistant"]
    if last_turn_only:
        targets = targets[-1:]
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for position, (start, _end) in enumerate(offsets):
        while span_index < len(targets) and start >= targets[span_index].end_token_end:
            span_index += 1
        if span_index == len(targets):
            break
        span = targets[span_index]
        if span.content_start <= start < span.end_token_end:
            labels[position] = ids[position]
    ids, labels = ids[:seq_len], labels[:seq_len]
    if all(label == IGNORE_INDEX for label in labels):
        raise RecordError("reply_beyond_seq_len", f"no assistant token within the first {seq_len} tokens", field_name)
    return {"input_ids": ids, "labels": labels}
