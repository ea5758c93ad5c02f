"""MiniMind's byte-level BPE tokenizer (6,400 tokens) and its chat template.

The bundled tokenizer has fixed special ids: ``<|endoftext|>``=0 (pad/unk), ``<|im_start|>``=1,
``<|im_end|>``=2 (end of turn, the stop token), then ``<think>``, ``</think>``, ``<answer>``,
``</answer>`` as single tokens for reasoning data. Its chat template renders MiniMind's ChatML text::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n

MiniMind's own tokenizers load as they are (a directory with ``tokenizer.json`` and ``tokenizer_config.json``):
MiniMind2's (three special tokens; its template adds a default system prompt) and minimind-3's (tool-call and
think tokens; its template always writes a ``<think>`` block and renders tools). Their special token names and
chat template come from ``tokenizer_config.json``; reasoning tags they lack as single tokens are weighted by
their multi-token spelling (:attr:`MiniMindTokenizer.reasoning_spellings`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minimind.tokenizer import chat_template

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *REASONING_TOKENS)
ROLES = ("system", "user", "assistant", "tool")

DEFAULT_SPECIAL_TOKENS = {"pad_token": PAD_TOKEN, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}

BUNDLED_DIR = Path(__file__).parent / "assets"

# The bundled tokenizer's template: every message as a ChatML turn, whatever its role.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


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


class MiniMindTokenizer:
    """``tokenizers.Tokenizer`` with its special tokens and chat template: what training and chat need."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str = CHAT_TEMPLATE,
        pad_token: str = PAD_TOKEN,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
    ):
        self.backend = tokenizer
        self.chat_template = chat_template
        self.special_tokens = {"pad_token": pad_token, "bos_token": bos_token, "eos_token": eos_token}
        self.pad_id = self._id(pad_token)
        self.bos_id = self._id(bos_token)
        self.eos_id = self._id(eos_token)

    @classmethod
    def from_path(cls, path: str | Path | None = None) -> MiniMindTokenizer:
        """Load a directory holding tokenizer.json (and tokenizer_config.json), or the file itself; None = bundled."""
        path = Path(path) if path is not None else BUNDLED_DIR
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        settings = _read_config(file.parent)
        return cls(Tokenizer.from_file(str(file)), **settings)

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
        """sha256 of the canonical tokenizer JSON, special tokens and chat template: equal fingerprints
        tokenize (and render conversations) identically."""
        parts = [self.backend.to_str()]
        # Only what differs from the bundled settings is added, so the bundled tokenizer's fingerprint is that of
        # its tokenizer.json alone (as recorded by corpora prepared before templates were configurable).
        if self.special_tokens != DEFAULT_SPECIAL_TOKENS:
            parts.append(json.dumps(self.special_tokens, sort_keys=True))
        if self.chat_template != CHAT_TEMPLATE:
            parts.append(self.chat_template)
        return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]

    @property
    def reasoning_spellings(self) -> tuple[tuple[int, ...], ...]:
        """Token ids of each reasoning tag: one id where the tag is a single token, its spelling otherwise."""
        return tuple(tuple(self.encode(tag)) for tag in REASONING_TOKENS)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [item.ids for item in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The conversation as text, rendered by this tokenizer's template (``tools=``, ``open_thinking=`` and
        other template variables pass through)."""
        return chat_template.render(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )

    def assistant_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant replies in rendered ``text`` (content through end-of-turn token)."""
        return chat_template.assistant_spans(text, self.special_tokens["bos_token"], self.special_tokens["eos_token"])

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that ``AutoTokenizer`` loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens,
            "unk_token": self.special_tokens["pad_token"],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 32768,
            "chat_template": self.chat_template,
        }
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
        )


def _read_config(directory: Path) -> dict:
    """Chat template and special token names from a transformers tokenizer directory, where it has them."""
    settings: dict = {}
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    for name in ("pad_token", "bos_token", "eos_token"):
        token = config.get(name)
        if isinstance(token, dict):  # transformers' AddedToken layout
            token = token.get("content")
        if isinstance(token, str):
            settings[name] = token
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is what apply_chat_template uses
        template = next((item["template"] for item in template if item.get("name") == "default"), None)
    jinja_file = directory / "chat_template.jinja"  # where transformers 5 saves it
    if template is None and jinja_file.exists():
        template = jinja_file.read_text(encoding="utf-8")
    if isinstance(template, str):
        settings["chat_template"] = template
    return settings


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
    "load_tokenizer",
    "train_tokenizer",
]
