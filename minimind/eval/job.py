"""The evaluation job: a checkpoint scored on a validation set over Ray, written as eval.json and eval.md.

``ray_jobs/eval.py`` is its command line; experiments (``minimind/experiment``) run it as a step. The
perplexity (or DPO reward) scoring is spread over Ray Data actors; the continuation score, chat
adherence and samples run in this process on ``device``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from minimind.data.formats import RecordError, encode_record, iter_jsonl
from minimind.data.formats.pretrain import pack_documents
from minimind.data.pipeline import Manifest, is_prepared
from minimind.data.token_store import TokenStore


@dataclass
class EvalOptions:
    """What to score and how (the fields of ``ray_jobs/eval.py``'s flags)."""

    checkpoint: str
    """Checkpoint, run or Hugging Face export directory."""
    data: list[str]
    """Validation jsonl files (local or pyarrow URIs), or a prepared corpus (its val split)."""
    format: str
    out: str
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
        rows = TokenStore(Manifest.load(files[0]), "val")  # memory-mapped: only the rows used are read
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


def run_eval(options: EvalOptions) -> tuple[Path, Path, dict]:
    """Score, write ``eval.json`` and ``eval.md`` into ``options.out``; return their paths and the result.

    Needs Ray started (``ray.init``). Raises ``ConfigError`` or ``DeviceError`` for what cannot run.
    """
    from minimind.devices import select_device
    from minimind.eval.distributed import ScoringJob, score_files
    from minimind.eval.metrics import chat_adherence, continuation_score
    from minimind.eval.report import write_report
    from minimind.eval.samples import CHAT_PROMPTS, CONTINUATION_PROMPTS, generate_samples
    from minimind.model.hf import load_for_inference
    from minimind.tokenizer import load_tokenizer

    device = select_device(options.device)  # before any scoring: a GPU asked for here must be usable
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
    metrics = score_files(options.data, job, options.actors, gpus_per_actor=gpus)

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
    result = {
        "checkpoint": options.checkpoint,
        "data": options.data,
        "format": options.format,
        "metrics": metrics,
        "samples": samples,
    }
    json_path, md_path = write_report(options.out, result)
    return json_path, md_path, result
