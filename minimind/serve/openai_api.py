"""The OpenAI HTTP API's requests and replies, without the server: what ``minimind/serve/app.py`` reads and
writes for ``/v1/chat/completions`` and ``/v1/completions``.

A request body is checked whole before any generation (:func:`parse_request`): a bad field is an
:class:`ApiError` with the HTTP status and OpenAI's error body (``{"error": {"message", "type", "param",
"code"}}``), naming the field. Replies are built as OpenAI's (``chat.completion``, ``chat.completion.chunk``,
``text_completion``), with ``usage`` and ``finish_reason`` (``stop``: the end-of-turn token or a stop
string; ``length``: ``max_tokens`` or the context).

Reasoning: with minimind-3's template the reply opens with a ``<think>`` block (the template writes its
opening tag into the prompt, or the model does); the text up to ``</think>`` is ``reasoning_content`` and
the rest ``content``, as MiniMind's own server and DeepSeek's API return them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from minimind.tokenizer.chat_template import dropped_fields

ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4
DEFAULT_MAX_TOKENS = 512
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ApiError(Exception):
    """A request the server refuses: ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """A checked request: what to render and how to sample."""

    chat: bool
    model: str
    messages: list[dict] = field(default_factory=list)
    prompt: str = ""
    tools: list | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    open_thinking: bool = False
    """Ask the template to open the reply's ``<think>`` block (minimind-3: MiniMind's ``open_thinking``)."""


def parse_request(body, chat: bool, models: list[str]) -> GenerationRequest:
    """``body`` (the decoded JSON) as a :class:`GenerationRequest`, or an :class:`ApiError` naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a string (GET /v1/models lists them)", "model")
    if model not in models:
        raise ApiError(404, f"The model '{model}' does not exist (served: {', '.join(models)})", "model",
                       "model_not_found")  # fmt: skip
    request = GenerationRequest(chat=chat, model=model)
    if chat:
        request.messages = _messages(body.get("messages"))
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ApiError(400, "'tools' must be a list of tool definitions", "tools")
        request.tools = tools or None
        request.open_thinking = _open_thinking(body)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' is required: a non-empty string (one prompt per request)", "prompt")
        request.prompt = prompt
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(400, f"'max_tokens' must be an integer >= 1, got {max_tokens!r}", "max_tokens")
        request.max_tokens = max_tokens
    request.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    request.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    request.repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True)
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise ApiError(400, f"'n' must be 1 (one choice per request), got {n!r}", "n")
    request.stop = _stop(body.get("stop"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise ApiError(400, f"'seed' must be an integer of 64 bits, got {seed!r}", "seed")
    request.seed = seed
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    request.stream = stream
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
        request.include_usage = options.get("include_usage", False)
    return request


def _open_thinking(body: dict) -> bool:
    """MiniMind's server takes ``open_thinking``, or ``chat_template_kwargs`` with ``open_thinking`` or Qwen's
    ``enable_thinking``: any of them true opens the reply's reasoning."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ApiError(400, "'chat_template_kwargs' must be an object", "chat_template_kwargs")
    wanted = False
    for where, source, key in (("open_thinking", body, "open_thinking"),
                               ("chat_template_kwargs.open_thinking", kwargs or {}, "open_thinking"),
                               ("chat_template_kwargs.enable_thinking", kwargs or {}, "enable_thinking")):  # fmt: skip
        value = source.get(key, False)
        if not isinstance(value, bool):
            raise ApiError(400, f"'{where}' must be true or false, got {value!r}", where)
        wanted = wanted or value
    return wanted


def render_chat(tokenizer, request: GenerationRequest) -> tuple[str, bool]:
    """The chat request's prompt as text, and whether it opens the reply's ``<think>`` block (minimind-3's
    template opens it when asked to, and writes an empty, closed block otherwise)."""
    extra = {"tools": request.tools} if request.tools else {}
    if request.open_thinking:
        extra["open_thinking"] = True
    text = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, **extra)
    if request.tools and dropped_fields(text, [{"role": "system", "tools": request.tools}]):
        raise ApiError(400, "this model's chat template does not render tools (the bundled one does not; minimind-3's "
                       "does), so the model would never see them", "tools")  # fmt: skip
    return text, text.rstrip().endswith(THINK_OPEN)


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}.content: only text parts ({{type: text, text}}) are supported",
                                   f"{where}.content")  # fmt: skip
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
        checked.append({**message, "content": content})
    return checked


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, got {value!r}", name)
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"'{name}' must be in {bounds}, got {value!r}", name)
    return float(value)


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return stops


def token_budget(prompt_tokens: int, max_tokens: int | None, context: int, field: str = "messages") -> int:
    """How many tokens the reply may have; an :class:`ApiError` when the prompt (the request's ``field``) and
    ``max_tokens`` do not fit."""
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                       f"{prompt_tokens}", field, "context_length_exceeded")  # fmt: skip
    if max_tokens is None:
        return min(room, DEFAULT_MAX_TOKENS)
    if max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
                       "completion). Please reduce the length of the prompt or the completion.", "max_tokens",
                       "context_length_exceeded")  # fmt: skip
    return max_tokens


class StopScanner:
    """The reply's text as it grows, cut at the first stop string; what may be sent so far.

    Text that could still become a stop string is held back, so a streamed reply never shows a stop
    string's first characters and the pieces join to the non-streamed text."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, text: str) -> str:
        """``text``: the whole reply so far. Returns the next piece that can be sent."""
        if self.stopped:
            return ""
        cut = min((index for stop in self.stops if (index := text.find(stop)) >= 0), default=None)
        if cut is not None:
            self.stopped, self.text = True, text[:cut]
            return self.flush()
        self.text = text
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        piece = text[self.sent : len(text) - hold]
        self.sent += len(piece)
        return piece

    def flush(self) -> str:
        piece = self.text[self.sent :]
        self.sent = len(self.text)
        return piece


class ReasoningSplitter:
    """Pieces of a reply routed to ``reasoning_content`` until ``</think>``, then to ``content``."""

    def __init__(self, thinking: bool):
        self.thinking = thinking  # the prompt opened a <think> block
        self.buffer = ""
        self.decided = thinking
        self.closed = False  # </think> seen: the line breaks after it are not content

    def feed(self, piece: str) -> list[tuple[str, str]]:
        """(field, text) pairs to send for ``piece``."""
        self.buffer += piece
        out: list[tuple[str, str]] = []
        if not self.decided:  # does the reply open a <think> block itself?
            stripped = self.buffer.lstrip()
            if THINK_OPEN.startswith(stripped):
                return out  # may still become "<think>"
            self.decided = True
            if stripped.startswith(THINK_OPEN):
                self.thinking, self.buffer = True, stripped[len(THINK_OPEN) :]
        if self.thinking:
            end = self.buffer.find(THINK_CLOSE)
            if end >= 0:
                reasoning, self.buffer = self.buffer[:end], self.buffer[end + len(THINK_CLOSE) :]
                self.thinking, self.closed = False, True
                if reasoning:
                    out.append(("reasoning_content", reasoning))
            else:
                hold = max((k for k in range(1, len(THINK_CLOSE)) if self.buffer.endswith(THINK_CLOSE[:k])), default=0)
                if len(self.buffer) > hold:
                    out.append(("reasoning_content", self.buffer[: len(self.buffer) - hold]))
                    self.buffer = self.buffer[len(self.buffer) - hold :]
                return out
        if self.closed:
            self.buffer = self.buffer.lstrip("\n")
            self.closed = not self.buffer
        if self.buffer:
            out.append(("content", self.buffer))
            self.buffer = ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self.buffer = (self.buffer.lstrip("\n") if self.closed else self.buffer), ""
        if not rest:
            return []
        return [("reasoning_content" if self.thinking else "content", rest)]


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """(reasoning_content, content) of a whole reply."""
    splitter = ReasoningSplitter(thinking)
    fields: dict[str, str] = {}
    for name, piece in splitter.feed(text) + splitter.flush():
        fields[name] = fields.get(name, "") + piece
    return fields.get("reasoning_content"), fields.get("content", "")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def chat_completion(request_id: str, model: str, reasoning: str | None, content: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict:  # fmt: skip
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}  # fmt: skip


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}  # fmt: skip


def text_completion(request_id: str, model: str, text: str, finish_reason: str | None,
                    usage_block: dict | None = None) -> dict:  # fmt: skip
    reply = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}  # fmt: skip
    if usage_block is not None:
        reply["usage"] = usage_block
    return reply
