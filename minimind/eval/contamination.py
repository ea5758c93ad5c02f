"""Benchmark contamination: which multiple-choice questions occur in a training corpus.

A question is contaminated when any 13-character window of its text (whitespace removed; the n-gram
overlap test of GPT-3's paper and of C-Eval-style audits, in characters because Chinese has no spaces)
occurs in a corpus text; a question shorter than 13 characters counts when it occurs whole. Corpora are
jsonl files (every string in a record: ``text``, conversation turns, DPO sides) or prepared corpora (their
train split's rows, decoded). The corpus is read once, over Ray Data, each block matched against every
question's windows at once.

MiniMind's README warns that fine-tuning on leaked benchmark questions reached ~97% on C-Eval: a subject
whose questions are marked here scores what the model memorised, not what it knows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np

from minimind.eval.choices import Question

NGRAM = 13
_SPACE = re.compile(r"\s+")


def normalized(text: str) -> str:
    return _SPACE.sub("", text)


def question_windows(question: Question, n: int = NGRAM) -> set[str]:
    text = normalized(question.question)
    if len(text) <= n:
        return {text} if text else set()
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def _strings(value) -> list[str]:
    """Every string in a decoded JSON record (texts, conversation turns, nested fields)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


class WindowMatcher:
    """Ray Data callable: the question windows found in a batch of corpus texts (one JSON list per batch)."""

    def __init__(self, windows: Sequence[str], n: int, tokenizer_path: str | None, decode: bool):
        self.n = n
        self.full = {w for w in windows if len(w) == n}
        self.short = [w for w in windows if len(w) < n]
        self.tokenizer = None
        if decode:
            from minimind.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer_path)

    def texts(self, batch: dict[str, np.ndarray]) -> list[str]:
        if self.tokenizer is not None:  # a prepared corpus: its rows' tokens
            return [self.tokenizer.decode([int(t) for t in ids]) for ids in batch["input_ids"]]
        texts = []
        for line in batch["text"]:
            try:
                texts.append("\n".join(_strings(json.loads(line))))
            except ValueError:
                texts.append(str(line))  # not JSON: its text as it is
        return texts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        found: set[str] = set()
        for text in self.texts(batch):
            text = normalized(text)
            found.update(w for w in self.short if w in text)
            n = self.n
            found.update(window for i in range(len(text) - n + 1) if (window := text[i : i + n]) in self.full)
        return {"found": np.array([json.dumps(sorted(found), ensure_ascii=False)])}


def contaminated(questions: Sequence[Question], corpora: Sequence[str], tokenizer_path: str | None = None,
                 actors: int = 4, n: int = NGRAM) -> list[bool]:  # fmt: skip
    """For each question, whether one of its windows occurs in any of ``corpora`` (needs Ray started)."""
    import ray

    from minimind.config import ConfigError
    from minimind.data.pipeline import Manifest, is_prepared
    from minimind.eval.distributed import actor_pool
    from minimind.tokenizer import load_tokenizer

    manifests = {corpus: Manifest.load(corpus) for corpus in corpora if is_prepared(corpus)}
    if manifests:  # a prepared corpus is read by decoding its tokens: with another tokenizer, other text
        fingerprint = load_tokenizer(tokenizer_path).fingerprint
        for corpus, manifest in manifests.items():
            if manifest.tokenizer_hash != fingerprint:
                raise ConfigError(
                    f"{corpus}: prepared with tokenizer {manifest.tokenizer_hash}, but its rows would be decoded with "
                    f"{tokenizer_path or 'the bundled tokenizer'} ({fingerprint}), into other text than the corpus "
                    "held; give the tokenizer it was prepared with, or its jsonl files"
                )
    windows = sorted(set().union(*(question_windows(q, n) for q in questions))) if questions else []
    found: set[str] = set()
    for corpus in corpora:
        prepared = corpus in manifests
        rows = manifests[corpus].ray_dataset("train") if prepared else ray.data.read_text(corpus)
        matched = rows.map_batches(WindowMatcher, fn_constructor_args=(windows, n, tokenizer_path, prepared),
                                   batch_size=256, batch_format="numpy", **actor_pool(actors, None))  # fmt: skip
        for row in matched.iter_rows():
            found.update(json.loads(row["found"]))
    return [bool(question_windows(q, n) & found) for q in questions]


def contamination_summary(records: Sequence[dict]) -> dict:
    """Per question file: questions, contaminated ones and their share (``records`` carry ``contaminated``)."""
    files: dict[str, dict] = {}
    for record in records:
        block = files.setdefault(record["source"].rsplit(":", 1)[0], {"questions": 0, "contaminated": 0})
        block["questions"] += 1
        block["contaminated"] += bool(record["contaminated"])
    for block in files.values():
        block["share"] = block["contaminated"] / block["questions"]
    return files
