"""DPO format ``{"chosen": [messages], "rejected": [messages]}`` sharing one prompt.

Both sides must have the same prompt (every message but the last) and end in an assistant reply;
only that final reply is a target, the prompt is masked.
"""

from __future__ import annotations

from minimind.data.formats.records import RecordError, require_messages
from minimind.data.formats.sft import encode_conversation


def parse(record: dict) -> tuple[list[dict], list[dict]]:
    chosen = require_messages(record, "chosen")
    rejected = require_messages(record, "rejected")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise RecordError("no_assistant_turn", "the last message must be the assistant reply", name)
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("prompt_mismatch", "chosen and rejected have different prompts", "rejected")
    return chosen, rejected


def encode_pair(pair: tuple[list[dict], list[dict]], tokenizer, seq_len: int) -> dict:
    chosen = encode_conversation(pair[0], tokenizer, seq_len, last_turn_only=True, field_name="chosen")
    rejected = encode_conversation(pair[1], tokenizer, seq_len, last_turn_only=True, field_name="rejected")
    return {
        "chosen_ids": chosen["input_ids"],
        "chosen_labels": chosen["labels"],
        "rejected_ids": rejected["input_ids"],
        "rejected_labels": rejected["labels"],
    }
