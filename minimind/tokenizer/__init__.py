"""MiniMind's byte-level BPE tokenizer (6,400 tokens) and its ChatML chat template.

Special tokens have fixed ids: ``<|endoftext|>``=0 (pad/unk), ``<|im_start|>``=1,
``<|im_end|>``=2 (end of turn, the stop token), then ``<think>``, ``</think>``, ``<answer>``,
``</answer>`` as single tokens for reasoning data. The chat template renders MiniMind's text::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *REASONING_TOKENS)
ROLES = ("system", "user", "assistant")

BUNDLED_DIR = Path(__file__).parent / "assets"

# The Jinja form of render_chat, stored with exports so transformers renders identical text.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TurnSpan:
    """Character span of one rendered message: its content and the end of its ``<|im_end|>``."""

    role: str
    content_start: int
    content_end: int
    end_token_end: int


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6400) -> Tokenizer:
    """Train byte-level BPE with MiniMind's settings on an iterator of documents."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for index, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != index:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {index}")
    return tokenizer


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[str, list[TurnSpan]]:
    """Render messages with the chat template; also return where each message's content lies."""
    parts: list[str] = []
    spans: list[TurnSpan] = []
    cursor = 0
    for message in messages:
        header = f"{BOS_TOKEN}{message['role']}\n"
        content = message["content"]
        content_start = cursor + len(header)
        content_end = content_start + len(content)
        end_token_end = content_end + len(EOS_TOKEN)
        parts.append(f"{header}{content}{EOS_TOKEN}\n")
        spans.append(TurnSpan(message["role"], content_start, content_end, end_token_end))
        cursor = end_token_end + 1
    if add_generation_prompt:
        parts.append(f"{BOS_TOKEN}assistant\n")
    return "".join(parts), spans


class MiniMindTokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the ids and chat rendering training needs."""

    def __init__(self, tokenizer: Tokenizer):
        self.backend = tokenizer
        self.pad_id = self._id(PAD_TOKEN)
        self.bos_id = self._id(BOS_TOKEN)
        self.eos_id = self._id(EOS_TOKEN)
        self.reasoning_ids = tuple(self._id(token) for token in REASONING_TOKENS)

    @classmethod
    def from_path(cls, path: str | Path | None = None) -> MiniMindTokenizer:
        """Load from a directory holding tokenizer.json, or the file itself; None = bundled."""
        path = Path(path) if path is not None else BUNDLED_DIR
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        return cls(Tokenizer.from_file(str(file)))

    def _id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token} token")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer JSON: equal fingerprints tokenize identically."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [item.ids for item in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return render_chat(messages, add_generation_prompt)[0]

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that ``AutoTokenizer`` loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": PAD_TOKEN,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 32768,
            "chat_template": CHAT_TEMPLATE,
        }
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
        )


def load_tokenizer(path: str | Path | None = None) -> MiniMindTokenizer:
    return MiniMindTokenizer.from_path(path)


__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "REASONING_TOKENS",
    "ROLES",
    "SPECIAL_TOKENS",
    "MiniMindTokenizer",
    "TurnSpan",
    "load_tokenizer",
    "render_chat",
    "train_tokenizer",
]
