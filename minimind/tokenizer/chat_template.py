"""Chat templates as transformers runs them: Jinja in a sandbox, so a tokenizer's own template renders here
exactly as ``AutoTokenizer.apply_chat_template`` (and so MiniMind's scripts) render it.

The environment copies transformers' settings (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``tojson``
that keeps non-ASCII text, ``raise_exception``); a template that renders differently here than there is a bug,
and the tests compare both token by token on MiniMind's own templates.

Assistant replies are located in the rendered text by ChatML markers (``<|im_start|>assistant\\n`` up to the next
``<|im_end|>``), as MiniMind's SFT dataset does; this holds for every template MiniMind ships and the caller checks
that one reply was found per assistant message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Message fields beyond role and content that MiniMind's data carries and its templates read.
MESSAGE_EXTRAS = ("reasoning_content", "tool_calls", "tools")

_THINK_TAGS = re.compile(r"</?think>")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    return environment.from_string(source)


def render(
    source: str, messages: Sequence[dict], *, add_generation_prompt: bool = False, special_tokens: dict, **kwargs
) -> str:
    """Render ``messages``; ``tools`` default to those on the first system message (MiniMind's data layout)."""
    if "tools" not in kwargs:
        kwargs["tools"] = next(
            (message["tools"] for message in messages if message.get("role") == "system" and message.get("tools")),
            None,
        )
    return compile_template(source).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **special_tokens, **kwargs
    )


def assistant_spans(text: str, bos_token: str, eos_token: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of each assistant reply: after its header, through its end-of-turn token."""
    header = f"{bos_token}assistant\n"
    spans = []
    cursor = text.find(header)
    while cursor != -1:
        start = cursor + len(header)
        end = text.find(eos_token, start)
        end = len(text) if end == -1 else end + len(eos_token)
        spans.append((start, end))
        cursor = text.find(header, end)
    return spans


def dropped_fields(text: str, messages: Sequence[dict]) -> list[str]:
    """Dotted names of message fields whose text is absent from the rendered ``text``.

    A template may move a reply's reasoning out of its content (minimind-3 splits at ``</think>``), so content is
    checked piece by piece between think tags; a template that drops a message or a field shows up here.
    """
    missing = []
    for index, message in enumerate(messages):
        pieces = [piece.strip() for piece in _THINK_TAGS.split(message.get("content") or "")]
        if any(piece and piece not in text for piece in pieces):
            missing.append(f"[{index}].content")
        reasoning = (message.get("reasoning_content") or "").strip()
        if reasoning and reasoning not in text:
            missing.append(f"[{index}].reasoning_content")
        for field in ("tool_calls", "tools"):
            if any(_function_name(item) not in text for item in message.get(field) or ()):
                missing.append(f"[{index}].{field}")
    return missing


def _function_name(item) -> str:
    """A tool's or tool call's function name (OpenAI's nested layout or a flat one); never found when absent."""
    if isinstance(item, dict):
        name = item.get("function", item).get("name") if isinstance(item.get("function", item), dict) else None
        if isinstance(name, str) and name:
            return name
    return "\0no function name\0"
