"""Multiple-choice benchmarks (C-Eval, CMMLU and the like) scored by each option's log-likelihood.

A question is right when the option the model finds most likely, as the text that follows the question, is
the answer: the context is the question (after ``shots`` solved questions of its subject) and ``答案：``, and
each option's text is scored as its continuation, by the sum of its tokens' log-probabilities
(``choice_accuracy``) and by that sum per UTF-8 byte of the option (``choice_accuracy_per_byte``: long options
are not penalised for their length). Small models score near chance on letters (``A``/``B``...), so the
options' own text is what is scored. The context starts as a pretraining document does, after the EOS
separator, and keeps its last ``seq_len`` tokens with the option.

Files (``load_questions``):

- C-Eval's and CMMLU's CSV layout: a header with ``question``, the option letters (``A``, ``B``, ...) and
  ``answer`` (any case; other columns such as ``id`` or ``explanation`` are ignored), one file per subject, the
  subject being the file's name without ``_val``/``_dev``/``_test`` (``computer_network_val.csv``).
- jsonl: ``{"question": str, "choices": [str, ...], "answer": index or letter, "subject": str (optional: the
  file's name)}``.

Every question needs its answer (C-Eval's test split has none: score its val split). A bad row is refused
naming file, line and field.
"""

from __future__ import annotations

import csv
import io
import json
import re
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

import torch

from minimind import storage
from minimind.config import ConfigError

ANSWER_CUE = "答案："
SPLIT_SUFFIX = re.compile(r"_(val|dev|test)$")


@dataclass
class Question:
    subject: str
    question: str
    choices: list[str]
    answer: int
    """Index of the right option."""
    source: str
    """``FILE:LINE`` of the question."""


def subject_of(path: str) -> str:
    return SPLIT_SUFFIX.sub("", PurePosixPath(path).stem)


def load_questions(paths: Sequence[str]) -> list[Question]:
    """Every question of ``paths`` (CSV or jsonl, local or object storage), in file order."""
    questions: list[Question] = []
    for path in paths:
        text = storage.read_text(path)
        loader = _load_jsonl if path.endswith((".jsonl", ".json")) else _load_csv
        found = loader(path, text)
        if not found:
            raise ConfigError(f"{path}: no questions")
        questions.extend(found)
    return questions


def _answer_index(value, count: int, where: str) -> int:
    if isinstance(value, bool) or value is None or value == "":
        raise ConfigError(f"{where}: answer: missing (C-Eval's test split has no answers: score its val split)")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in string.ascii_uppercase:
        index = string.ascii_uppercase.index(value.strip().upper())
    else:
        raise ConfigError(f"{where}: answer: {value!r} is neither an option's letter nor its index")
    if not 0 <= index < count:
        raise ConfigError(f"{where}: answer: {value!r} names no option (there are {count})")
    return index


def _load_csv(path: str, text: str) -> list[Question]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return []
    columns = {name.strip().lower(): i for i, name in enumerate(header)}
    letters = []
    for letter in string.ascii_lowercase:
        if letter not in columns:
            break
        letters.append(columns[letter])
    missing = [name for name in ("question", "answer") if name not in columns]
    if missing or len(letters) < 2:
        need = ", ".join(missing) if missing else "option columns A, B, ..."
        raise ConfigError(f"{path}:1: the header has no {need} (C-Eval/CMMLU layout: id,question,A,B,C,D,answer)")
    subject = subject_of(path)
    questions = []
    row_line = reader.line_num + 1
    for row in reader:
        where = f"{path}:{row_line}"
        row_line = reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise ConfigError(f"{where}: {len(row)} columns where the header has {len(header)}")
        question = row[columns["question"]].strip()
        if not question:
            raise ConfigError(f"{where}: question: empty")
        choices = [row[i].strip() for i in letters]
        answer = _answer_index(row[columns["answer"]], len(choices), where)
        questions.append(Question(subject, question, choices, answer, where))
    return questions


def _load_jsonl(path: str, text: str) -> list[Question]:
    questions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: a question is a JSON object")
        question, choices = record.get("question"), record.get("choices")
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{where}: question: a non-empty string is required")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ConfigError(f"{where}: choices: a list of at least two strings is required")
        subject = record.get("subject", subject_of(path))
        if not isinstance(subject, str) or not subject:
            raise ConfigError(f"{where}: subject: a non-empty string")
        answer = _answer_index(record.get("answer"), len(choices), where)
        questions.append(Question(subject, question.strip(), [c.strip() for c in choices], answer, where))
    return questions


def shots_by_subject(dev: list[Question], shots: int) -> dict[str, list[Question]]:
    """The first ``shots`` solved questions of each subject of ``dev``."""
    found: dict[str, list[Question]] = defaultdict(list)
    for question in dev:
        if len(found[question.subject]) < shots:
            found[question.subject].append(question)
    return dict(found)


def context_text(question: Question, shots: Sequence[Question]) -> str:
    solved = "".join(f"{s.question}\n{ANSWER_CUE}{s.choices[s.answer]}\n\n" for s in shots)
    return f"{solved}{question.question}\n{ANSWER_CUE}"


@torch.no_grad()
def option_log_likelihoods(
    model, tokenizer, context: str, options: Sequence[str], seq_len: int, where: str = "options"
) -> list[float]:
    """Sum of log-probabilities of each option's tokens after ``context``, all options in one padded batch.

    An option must leave room for at least one token of context in ``seq_len`` (the first token it is scored on
    is predicted from the one before it); a longer one is refused, naming ``where``, rather than scored on a
    window that cut its own start off.
    """
    device = model.lm_head.weight.device
    prefix = [tokenizer.eos_id, *tokenizer.encode(context)]
    rows, spans = [], []
    for index, option in enumerate(options):
        option_ids = tokenizer.encode(option) or [tokenizer.eos_id]  # an empty option: the text ends there
        if len(option_ids) >= seq_len:
            raise ConfigError(
                f"{where}: choices[{index}]: {len(option_ids)} tokens, too long to score in a {seq_len}-token "
                "context (an option needs at least one token of context before it)"
            )
        ids = (prefix + option_ids)[-seq_len:]
        rows.append(ids)
        spans.append(len(option_ids))
    width = max(len(ids) for ids in rows)
    batch = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        batch[i, : len(ids)] = torch.tensor(ids)  # right padding: a causal model's earlier positions ignore it
    logits, _, _ = model(batch.to(device))
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    scores = []
    for i, (ids, span) in enumerate(zip(rows, spans)):
        targets = torch.tensor(ids[len(ids) - span :], device=device)
        positions = torch.arange(len(ids) - span - 1, len(ids) - 1, device=device)
        scores.append(float(log_probs[i, positions, targets].sum()))
    return scores


def score_question(model, tokenizer, question: Question, shots: Sequence[Question], seq_len: int) -> dict:
    """One question's record: its option scores, the picks by sum and per byte, and whether each is right."""
    context = context_text(question, shots)
    scores = option_log_likelihoods(model, tokenizer, context, question.choices, seq_len, where=question.source)
    per_byte = [score / max(1, len(choice.encode("utf-8"))) for score, choice in zip(scores, question.choices)]
    pick, pick_per_byte = (max(range(len(s)), key=s.__getitem__) for s in (scores, per_byte))
    return {
        **asdict(question),
        "shots": len(shots),
        "scores": scores,
        "pick": pick,
        "pick_per_byte": pick_per_byte,
        "correct": pick == question.answer,
        "correct_per_byte": pick_per_byte == question.answer,
    }


def summarize(records: Sequence[dict]) -> dict:
    """Accuracy overall and per subject, each with its chance level (the mean of 1 / options)."""

    def block(rows):
        return {
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "accuracy_per_byte": sum(r["correct_per_byte"] for r in rows) / len(rows),
            "chance": sum(1 / len(r["choices"]) for r in rows) / len(rows),
            "questions": len(rows),
        }

    subjects: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        subjects[record["subject"]].append(record)
    overall = block(records)
    return {
        "choice_accuracy": overall["accuracy"],
        "choice_accuracy_per_byte": overall["accuracy_per_byte"],
        "choice_chance": overall["chance"],
        "choice_questions": overall["questions"],
        "choice_subjects": {name: block(rows) for name, rows in sorted(subjects.items())},
    }
