"""SFT format ``{"conversations": [{"role", "content"}, ...]}`` (with MiniMind's optional tool and reasoning fields).

The conversation is rendered with the tokenizer's chat template and tokenized as one string (exactly what the
model sees when chatting). Labels are set only on tokens that start inside an assistant reply: everything the
template writes after the ``<|im_start|>assistant\\n`` header (minimind-3's ``<think>`` block and tool calls
included) through the closing ``<|im_end|>``; system, user, tool results, headers and padding are ignored.
MiniMind also labels the newline after ``<|im_end|>``; it is never generated (generation stops at
``<|im_end|>``), so it is not trained here. A template that renders a different number of replies than the
conversation has, or leaves out a message's text, rejects the record instead of training on the wrong tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from minimind.data.formats.pretrain import IGNORE_INDEX
from minimind.data.formats.records import RecordError, require_messages
from minimind.tokenizer.chat_template import dropped_fields


def parse(record: dict) -> list[dict[str, str]]:
    return require_messages(record, "conversations")


def encode_conversation(
    messages: Sequence[dict], tokenizer, seq_len: int, last_turn_only: bool = False, field_name: str = "conversations"
) -> dict:
    """``input_ids``/``labels`` for a conversation, truncated to ``seq_len`` tokens.

    ``last_turn_only`` trains on the final assistant message alone (DPO responses).
    """
    text = tokenizer.apply_chat_template(messages)
    dropped = dropped_fields(text, messages)
    if dropped:
        raise RecordError("not_rendered", "the tokenizer's chat template leaves this out", field_name + dropped[0])
    targets = tokenizer.assistant_spans(text)
    replies = sum(message["role"] == "assistant" for message in messages)
    if len(targets) != replies:
        raise RecordError(
            "template_mismatch",
            f"the chat template rendered {len(targets)} assistant replies for {replies} assistant messages",
            field_name,
        )
    ids, offsets = tokenizer.encode_with_offsets(text)
    if last_turn_only:
        targets = targets[-1:]
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for position, (start, _end) in enumerate(offsets):
        while span_index < len(targets) and start >= targets[span_index][1]:
            span_index += 1
        if span_index == len(targets):
            break
        span_start, span_end = targets[span_index]
        if span_start <= start < span_end:
            labels[position] = ids[position]
    ids, labels = ids[:seq_len], labels[:seq_len]
    if all(label == IGNORE_INDEX for label in labels):
        raise RecordError("reply_beyond_seq_len", f"no assistant token within the first {seq_len} tokens", field_name)
    return {"input_ids": ids, "labels": labels}
