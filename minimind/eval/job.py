"""The evaluation job: a checkpoint scored on a validation set and multiple-choice questions over Ray, written as
eval.json and eval.md (and each question's scores in choices.jsonl).

``ray_jobs/eval.py`` is its command line; experiments (``minimind/experiment``) run it as a step. The
perplexity (or DPO reward) scoring and the multiple-choice questions (``minimind.eval.choices``) are spread over
Ray Data actors; the continuation score, chat adherence and samples run in this process on ``device``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from minimind import storage
from minimind.config import ConfigError
from minimind.data.formats import RecordError, encode_record, iter_jsonl
from minimind.data.formats.pretrain import pack_documents
from minimind.data.pipeline import Manifest, is_prepared
from minimind.data.pipeline.manifest import local_corpus
from minimind.data.token_store import TokenStore

CHOICES_FILE = "choices.jsonl"
"""Each multiple-choice question's record (its options' scores, the picks, whether they were right)."""


@dataclass
class EvalOptions:
    """What to score and how (the fields of ``ray_jobs/eval.py``'s flags)."""

    checkpoint: str
    """Checkpoint, run or Hugging Face export directory."""
    data: list[str]
    """Validation jsonl files (local or pyarrow URIs), or a prepared corpus (its val split); may be empty when
    ``choices`` are given."""
    format: str
    out: str
    choices: list[str] = dataclasses.field(default_factory=list)
    """Multiple-choice question files (C-Eval/CMMLU CSV, or jsonl): ``choice_accuracy`` overall and per subject."""
    dev: list[str] = dataclasses.field(default_factory=list)
    """Solved questions (C-Eval's dev split) to put before each question of the same subject (``shots``)."""
    shots: int = 0
    contamination: list[str] = dataclasses.field(default_factory=list)
    """Training corpora (jsonl files or prepared corpora) to look for the questions in: each question file's
    contaminated share, each subject's count (``minimind.eval.contamination``)."""
    seq_len: int = 512
    tokenizer: str | None = None
    adapter: str | None = None
    """LoRA checkpoint to apply."""
    reference: str | None = None
    """DPO: the reference model for implicit rewards."""
    beta: float = 0.1
    actors: int = 4
    """Scoring actors (CPU actors: capped at the cluster's CPUs - 1)."""
    use_gpu: bool = False
    gpus_per_actor: float = 1.0
    device: str = "auto"
    """Where the continuation score, chat adherence and samples run: auto, cpu, cuda or cuda:N."""
    continuation_docs: int = 16
    prefix_tokens: int = 32
    continuation_tokens: int = 16
    max_new_tokens: int = 96
    seed: int = 0


def leading_documents(files: list[str], fmt: str, tokenizer, seq_len: int, count: int) -> list[list[int]]:
    """Token ids of the first ``count`` usable records (packed blocks for pretrain) for the continuation score."""
    if len(files) == 1 and is_prepared(files[0]):
        # Memory-mapped: only the rows used are read (a corpus at a URI: this node's cached copy, as training's).
        rows = TokenStore(Manifest.load(local_corpus(files[0])), "val")
        return [rows[i]["input_ids"].tolist() for i in range(min(count, len(rows)))]
    encoded = []
    lines = itertools.chain.from_iterable(iter_jsonl(path) for path in files)
    for _, record in itertools.islice(lines, count * 4):
        if isinstance(record, RecordError):
            continue
        try:
            encoded.append(encode_record(fmt, record, tokenizer, seq_len))
        except RecordError:
            continue
    if fmt == "pretrain":
        return [block["input_ids"] for block in pack_documents(encoded, seq_len)][:count]
    return [example["input_ids"] for example in encoded][:count]


def run_eval(options: EvalOptions) -> tuple[str, str, dict]:
    """Score, write ``eval.json`` and ``eval.md`` into ``options.out``; return their paths and the result.

    Needs Ray started (``ray.init``). Raises ``ConfigError`` or ``DeviceError`` for what cannot run.
    """
    from minimind.devices import select_device
    from minimind.eval.choices import load_questions, shots_by_subject, summarize
    from minimind.eval.distributed import ScoringJob, score_choices, score_files
    from minimind.eval.report import write_report

    device = select_device(options.device)  # before any scoring: a GPU asked for here must be usable
    if not options.data and not options.choices:
        raise ConfigError("nothing to score: give validation data, multiple-choice questions (choices), or both")
    if options.shots and not options.dev:
        raise ConfigError(f"shots: {options.shots} solved questions need a dev file to take them from (dev)")
    if options.contamination and not options.choices:
        raise ConfigError("contamination: the training corpora are checked for multiple-choice questions (choices)")
    from minimind.model.hf import checkpoint_tokenizer

    tokenizer = checkpoint_tokenizer(options.checkpoint, options.tokenizer)  # the one it trained with
    options.tokenizer = None if tokenizer is None else str(Path(tokenizer).resolve())  # actors run elsewhere
    job = ScoringJob(
        options.checkpoint,
        options.format,
        options.seq_len,
        options.tokenizer,
        options.adapter,
        options.reference,
        options.beta,
        device="cuda" if options.use_gpu else "cpu",
    )
    gpus = options.gpus_per_actor if options.use_gpu else None
    metrics: dict = {}
    samples: list = []
    if options.choices:
        questions = load_questions(options.choices)  # a bad file fails before any model loads
        shots = shots_by_subject(load_questions(options.dev), options.shots) if options.shots else {}
        records = score_choices(questions, shots, job, options.actors, gpus_per_actor=gpus)
        metrics.update(summarize(records))
        if options.contamination:
            from minimind.eval.contamination import contaminated, contamination_summary

            flags = contaminated(questions, options.contamination, options.tokenizer, options.actors)
            for record, flag in zip(records, flags):
                record["contaminated"] = flag
            metrics["choice_contamination"] = contamination_summary(records)
            for subject, block in metrics["choice_subjects"].items():
                block["contaminated"] = sum(r["contaminated"] for r in records if r["subject"] == subject)
        storage.write_text(storage.join(options.out, CHOICES_FILE),
                           "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))  # fmt: skip
    if options.data:
        metrics = {**score_files(options.data, job, options.actors, gpus_per_actor=gpus), **metrics}
        samples = _driver_scores(options, device, metrics)
    result = {
        "checkpoint": options.checkpoint,
        "data": options.data,
        "format": options.format,
        "metrics": metrics,
        "samples": samples,
    }
    json_path, md_path = write_report(options.out, result)
    return json_path, md_path, result


def _driver_scores(options: EvalOptions, device, metrics: dict) -> list[dict]:
    """The continuation score and chat adherence (into ``metrics``) and the samples, in this process."""
    from minimind.eval.metrics import chat_adherence, continuation_score
    from minimind.eval.samples import CHAT_PROMPTS, CONTINUATION_PROMPTS, generate_samples
    from minimind.model.hf import load_for_inference
    from minimind.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(options.tokenizer)
    model = load_for_inference(options.checkpoint, device, options.adapter)
    if options.format != "dpo" and options.continuation_docs:
        documents = leading_documents(
            options.data, options.format, tokenizer, options.seq_len, options.continuation_docs * 4
        )
        metrics.update(
            continuation_score(
                model, documents, options.prefix_tokens, options.continuation_tokens, options.continuation_docs
            )
        )
    chat = options.format != "pretrain"
    if chat:
        metrics.update(chat_adherence(model, tokenizer, CHAT_PROMPTS, options.max_new_tokens))
    samples = generate_samples(
        model,
        tokenizer,
        CHAT_PROMPTS if chat else CONTINUATION_PROMPTS,
        chat=chat,
        seed=options.seed,
        max_new_tokens=options.max_new_tokens,
        temperature=0.7,
        repetition_penalty=1.2,
    )
    return samples
